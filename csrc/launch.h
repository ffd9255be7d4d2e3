// The one place where the nvcc build and the emulation build (VITKERN_EMULATION) differ: kernel launch, the
// CUDA runtime header, how a kernel reaches its dynamic shared memory, and vector loads and stores (checked for
// alignment in the emulation). Torch-free, so the standalone test drivers (csrc/emulation/*_main.cpp) use it too.
#pragma once

#include <cstddef>
#include <stdexcept>
#include <string>
#include <utility>

// VITKERN_UNROLL / VITKERN_NO_UNROLL before a loop: unroll it fully / keep it a loop under nvcc; the host compiler
// decides for itself.
#ifdef VITKERN_EMULATION
#define VITKERN_UNROLL
#define VITKERN_NO_UNROLL
#else
#define VITKERN_UNROLL _Pragma("unroll")
#define VITKERN_NO_UNROLL _Pragma("unroll 1")
#endif

#ifdef VITKERN_EMULATION
#include "emulation/cuda_emulation.h"
// Declares `type* name` pointing at the launch's dynamic shared memory.
#define VITKERN_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(vitkern::emu::dynamic_shared_memory())
#else
#include <cuda_runtime.h>
#define VITKERN_DYNAMIC_SHARED(type, name)                          \
  extern __shared__ __align__(16) unsigned char vitkern_smem_raw[]; \
  type* name = reinterpret_cast<type*>(vitkern_smem_raw)
#endif

namespace vitkern {

// kernel<<<grid, block, shared_bytes, stream>>>(args...) under nvcc; the emulated launch otherwise.
template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, std::size_t shared_bytes, cudaStream_t stream,
            Args&&... args) {
#ifdef VITKERN_EMULATION
  (void)stream;
  emu::launch(kernel, grid, block, shared_bytes, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, shared_bytes, stream>>>(std::forward<Args>(args)...);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("vitkern: kernel launch failed: ") + cudaGetErrorString(err));
  }
#endif
}

// Lets `kernel` take `bytes` of dynamic shared memory past the 48 KiB a launch gets by default (the attribute the
// CUDA runtime asks for); nothing to do in the emulation.
template <typename Kernel>
void allow_shared(Kernel kernel, std::size_t bytes) {
#ifdef VITKERN_EMULATION
  (void)kernel;
  (void)bytes;
#else
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("vitkern: dynamic shared memory: ") + cudaGetErrorString(err));
  }
#endif
}

// *reinterpret_cast<const V*>(p): one vector access (V: a 2-, 4-, 8- or 16-byte type as wide as its alignment,
// such as float4, uint4 or a struct alignas(16)). p must be sizeof(V)-aligned, as the GPU requires; the
// emulation checks it and aborts naming the kernel and the address. Every vector access of csrc/ goes through
// these two.
template <typename V, typename T>
__device__ __forceinline__ V load_vector(const T* p) {
  static_assert(sizeof(V) == alignof(V) && sizeof(V) <= 16, "load_vector: V must be a 2-16 byte aligned vector type");
#ifdef VITKERN_EMULATION
  emu::check_aligned(p, sizeof(V), "vector load");
#endif
  return *reinterpret_cast<const V*>(p);
}

template <typename V, typename T>
__device__ __forceinline__ void store_vector(T* p, const V& value) {
  static_assert(sizeof(V) == alignof(V) && sizeof(V) <= 16, "store_vector: V must be a 2-16 byte aligned vector type");
#ifdef VITKERN_EMULATION
  emu::check_aligned(p, sizeof(V), "vector store");
#endif
  *reinterpret_cast<V*>(p) = value;
}

}  // namespace vitkern
