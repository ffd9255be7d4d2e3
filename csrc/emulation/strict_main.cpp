// Standalone checks of what the emulation (csrc/emulation/cuda_emulation.h) does stricter than it has to, so that
// kernels which would break on a GPU break here too; without torch. tests/test_emulation_runtime.py builds it with
// g++ and runs one mode:
//
//   strict poison            static (plain and template kernels) and dynamic shared memory hold 0xFF bytes at
//                            the start of every block, whatever the previous block wrote
//   strict order             prints the order in which the blocks of a 64-block launch ran
//   strict order_dependent   a kernel that is right only when blocks run in index order: must report FAILED
//   strict vectors           load_vector / store_vector copy 16-byte vectors
//   strict misaligned_load   load_vector from an address 4 bytes off 16: must abort, naming kernel and address
//   strict misaligned_store  store_vector likewise
//
// Prints "<mode> ok" and exits 0 on success; prints what differs and exits 1 otherwise.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "launch.h"

namespace {

using vitkern::launch;

constexpr int kBlocks = 64;
constexpr int kThreads = 64;

// Whether the bytes of *p are all 0xFF (the poison).
template <typename T>
__device__ bool poisoned(const T* p) {
  unsigned char bytes[sizeof(T)];
  std::memcpy(bytes, p, sizeof(T));
  for (unsigned char b : bytes) {
    if (b != 0xFF) {
      return false;
    }
  }
  return true;
}

// Each block checks its static shared array is poisoned, then overwrites it for the next block to see.
__global__ void static_shared_kernel(int* unpoisoned) {
  __shared__ int values[kThreads];
  if (!poisoned(&values[threadIdx.x])) {
    atomicAdd(unpoisoned, 1);
  }
  __syncthreads();
  values[threadIdx.x] = static_cast<int>(blockIdx.x);
  __syncthreads();
}

template <typename T>
__global__ void template_shared_kernel(int* unpoisoned) {
  __shared__ __align__(16) T values[kThreads];
  __shared__ T second[3];
  if (!poisoned(&values[threadIdx.x]) || (threadIdx.x < 3 && !poisoned(&second[threadIdx.x]))) {
    atomicAdd(unpoisoned, 1);
  }
  __syncthreads();
  values[threadIdx.x] = static_cast<T>(blockIdx.x);
  if (threadIdx.x < 3) {
    second[threadIdx.x] = static_cast<T>(0);
  }
  __syncthreads();
}

__global__ void dynamic_shared_kernel(int* unpoisoned) {
  VITKERN_DYNAMIC_SHARED(float, values);
  if (!poisoned(&values[threadIdx.x]) || values[threadIdx.x] == values[threadIdx.x]) {  // poisoned floats: NaN
    atomicAdd(unpoisoned, 1);
  }
  __syncthreads();
  values[threadIdx.x] = 0.0f;
  __syncthreads();
}

__global__ void order_kernel(unsigned int* order, unsigned int* count) {
  if (threadIdx.x == 0) {
    order[atomicAdd(count, 1u)] = blockIdx.x;
  }
}

// Block b extends a chain the blocks before it built: right only if they ran first.
__global__ void order_dependent_kernel(int* chain) {
  if (threadIdx.x == 0) {
    chain[blockIdx.x] = blockIdx.x == 0 ? 1 : chain[blockIdx.x - 1] + 1;
  }
}

__global__ void vector_kernel(const float* in, float* out) {
  const int i = static_cast<int>(threadIdx.x) * 4;
  vitkern::store_vector(out + i, vitkern::load_vector<float4>(in + i));
}

bool report(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAILED: %s\n", what);
  }
  return ok;
}

bool run_poison() {
  int plain = 0, floats = 0, doubles = 0, dynamic = 0;
  launch(static_shared_kernel, dim3(kBlocks), dim3(kThreads), 0, nullptr, &plain);
  launch(template_shared_kernel<float>, dim3(kBlocks), dim3(kThreads), 0, nullptr, &floats);
  launch(template_shared_kernel<double>, dim3(kBlocks), dim3(kThreads), 0, nullptr, &doubles);
  launch(dynamic_shared_kernel, dim3(kBlocks), dim3(kThreads), kThreads * sizeof(float), nullptr, &dynamic);
  return report(plain == 0, "static shared memory of a kernel not poisoned at a block start") &&
         report(floats == 0 && doubles == 0, "static shared memory of a template kernel not poisoned") &&
         report(dynamic == 0, "dynamic shared memory not poisoned at a block start");
}

bool run_order() {
  std::vector<unsigned int> order(kBlocks);
  unsigned int count = 0;
  launch(order_kernel, dim3(kBlocks), dim3(32), 0, nullptr, order.data(), &count);
  for (unsigned int b : order) {
    std::printf("%u ", b);
  }
  std::printf("\n");
  return report(count == kBlocks, "every block ran once");
}

bool run_order_dependent() {
  std::vector<int> chain(kBlocks, 0);
  launch(order_dependent_kernel, dim3(kBlocks), dim3(32), 0, nullptr, chain.data());
  bool ok = true;
  for (int b = 0; b < kBlocks; ++b) {
    ok &= chain[b] == b + 1;
  }
  return report(ok, "the chain built by order_dependent_kernel (its blocks did not run in index order)");
}

bool run_vectors(int load_offset, int store_offset, int threads) {
  alignas(16) float in[kThreads * 4 + 4];
  alignas(16) float out[kThreads * 4 + 4] = {};
  for (int i = 0; i < kThreads * 4 + 4; ++i) {
    in[i] = static_cast<float>(i);
  }
  const float* src = in + load_offset;
  float* dst = out + store_offset;
  std::printf("load %p store %p\n", static_cast<const void*>(src), static_cast<void*>(dst));
  std::fflush(stdout);
  launch(vector_kernel, dim3(1), dim3(threads), 0, nullptr, src, dst);
  bool ok = true;
  for (int i = 0; i < threads * 4; ++i) {
    ok &= dst[i] == src[i];
  }
  return report(ok, "16-byte vectors copied by load_vector / store_vector");
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc == 2 ? argv[1] : "";
  bool ok;
  if (mode == "poison") {
    ok = run_poison();
  } else if (mode == "order") {
    ok = run_order();
  } else if (mode == "order_dependent") {
    ok = run_order_dependent();
  } else if (mode == "vectors") {
    ok = run_vectors(0, 0, kThreads);
  } else if (mode == "misaligned_load") {
    ok = run_vectors(1, 0, 1);
  } else if (mode == "misaligned_store") {
    ok = run_vectors(0, 1, 1);
  } else {
    std::printf("usage: %s poison|order|order_dependent|vectors|misaligned_load|misaligned_store\n", argv[0]);
    return 2;
  }
  if (ok) {
    std::printf("%s ok\n", mode.c_str());
  }
  return ok ? 0 : 1;
}
