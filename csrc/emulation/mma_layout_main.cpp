// Standalone check of the tensor-core helpers of csrc/mma.h under the emulation, without torch.
// tests/test_emulation_runtime.py builds it with g++ and compares what it prints with the fragment tables of the
// PTX ISA, written out independently in the test:
//
//   mma_layout layout f16|bf16   one warp loads encoded tiles with ldmatrix_a / ldmatrix_b / ldmatrix_b_trans and
//                                multiplies them with mma_m16n8k16; prints, per lane and fragment element,
//                                "<what> <lane> <i> <value...>": the decoded value each lane holds (ldmatrix_*),
//                                the coordinates a_coord / b_coord / c_coord give, and D (mma)
//   mma_layout misaligned        ldmatrix_a from a row address 2 bytes off 16: must abort, naming kernel and address
//   mma_layout global            ldmatrix_a from global memory: must abort
//   mma_layout partial_warp      mma_m16n8k16 in a block of 16 threads: must abort
//
// The tiles: A[r][k] = 16 r + k, B[k][n] = 8 k + n, C[r][n] = r - 2 n; every value and every sum of D = A B + C is
// an integer exact in fp16, bf16 and fp32, so each element names its coordinates.
#include <cstdio>
#include <string>
#include <vector>

#include "mma.h"

namespace {

namespace mma = vitkern::mma;
using vitkern::launch;

constexpr int kLdA = 24;   // row stride of the A tile: padded, 48 bytes, keeps rows 16-byte aligned
constexpr int kLdB = 24;   // [n][k] tile
constexpr int kLdBt = 16;  // [k][n] tile
constexpr int kLanes = 32;

struct Results {
  float a[kLanes][8];
  float b[kLanes][4];
  float b_trans[kLanes][4];
  float d[kLanes][4];
};

template <typename T>
__global__ void layout_kernel(Results* out) {
  __shared__ __align__(16) T a_tile[16 * kLdA];
  __shared__ __align__(16) T b_nk[8 * kLdB];
  __shared__ __align__(16) T b_kn[16 * kLdBt];
  const int lane = static_cast<int>(threadIdx.x);
  for (int e = lane; e < 16 * 16; e += kLanes) {
    const int r = e / 16, k = e % 16;
    a_tile[r * kLdA + k] = mma::Element<T>::from_float(static_cast<float>(16 * r + k));
  }
  for (int e = lane; e < 16 * 8; e += kLanes) {
    const int k = e / 8, n = e % 8;
    b_nk[n * kLdB + k] = mma::Element<T>::from_float(static_cast<float>(8 * k + n));
    b_kn[k * kLdBt + n] = mma::Element<T>::from_float(static_cast<float>(8 * k + n));
  }
  __syncthreads();
  mma::FragA a;
  mma::FragB b, bt;
  mma::ldmatrix_a(a, a_tile, kLdA);
  mma::ldmatrix_b(b, b_nk, kLdB);
  mma::ldmatrix_b_trans(bt, b_kn, kLdBt);
  for (int i = 0; i < 8; ++i) {
    out->a[lane][i] = mma::unpack<T>(a.reg[i / 2], i % 2);
  }
  for (int i = 0; i < 4; ++i) {
    out->b[lane][i] = mma::unpack<T>(b.reg[i / 2], i % 2);
    out->b_trans[lane][i] = mma::unpack<T>(bt.reg[i / 2], i % 2);
  }
  mma::FragC c;
  for (int i = 0; i < 4; ++i) {
    int r, n;
    mma::c_coord(lane, i, r, n);
    c.reg[i] = static_cast<float>(r - 2 * n);
  }
  mma::mma_m16n8k16<T>(c, a, b, c);
  for (int i = 0; i < 4; ++i) {
    out->d[lane][i] = c.reg[i];
  }
}

__global__ void misaligned_kernel() {
  __shared__ __align__(16) __half tile[16 * kLdA + 8];
  mma::FragA a;
  mma::ldmatrix_a(a, tile + 1, kLdA);
}

__global__ void global_kernel(const __half* tile) {
  mma::FragA a;
  mma::ldmatrix_a(a, tile, kLdA);
}

__global__ void partial_warp_kernel() {
  mma::FragA a{};
  mma::FragB b{};
  mma::FragC c{};
  mma::mma_m16n8k16<__half>(c, a, b, c);
}

template <typename T>
int run_layout() {
  Results results{};
  launch(layout_kernel<T>, dim3(1), dim3(kLanes), 0, nullptr, &results);
  for (int lane = 0; lane < kLanes; ++lane) {
    for (int i = 0; i < 8; ++i) {
      int r, c;
      mma::a_coord(lane, i, r, c);
      std::printf("ldmatrix_a %d %d %g\na_coord %d %d %d %d\n", lane, i, results.a[lane][i], lane, i, r, c);
    }
    for (int i = 0; i < 4; ++i) {
      int r, c;
      mma::b_coord(lane, i, r, c);
      std::printf("ldmatrix_b %d %d %g\nldmatrix_b_trans %d %d %g\nb_coord %d %d %d %d\n", lane, i,
                  results.b[lane][i], lane, i, results.b_trans[lane][i], lane, i, r, c);
      mma::c_coord(lane, i, r, c);
      std::printf("c_coord %d %d %d %d\nmma %d %d %g\n", lane, i, r, c, lane, i, results.d[lane][i]);
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc >= 2 ? argv[1] : "";
  if (mode == "layout" && argc == 3 && std::string(argv[2]) == "f16") {
    return run_layout<__half>();
  }
  if (mode == "layout" && argc == 3 && std::string(argv[2]) == "bf16") {
    return run_layout<__nv_bfloat16>();
  }
  if (mode == "misaligned") {
    launch(misaligned_kernel, dim3(1), dim3(kLanes), 0, nullptr);
  } else if (mode == "global") {
    const std::vector<__half> tile(16 * kLdA);
    launch(global_kernel, dim3(1), dim3(kLanes), 0, nullptr, tile.data());
  } else if (mode == "partial_warp") {
    launch(partial_warp_kernel, dim3(1), dim3(16), 0, nullptr);
  } else {
    std::printf("usage: %s layout f16|bf16 | misaligned | global | partial_warp\n", argv[0]);
    return 2;
  }
  std::printf("%s: no fault\n", mode.c_str());
  return 1;
}
