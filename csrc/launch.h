// The one place where the nvcc build and the emulation build (VITKERN_EMULATION) differ: kernel launch, the
// CUDA runtime header, and how a kernel reaches its dynamic shared memory. Torch-free, so the standalone test
// driver (csrc/emulation/selftest_main.cpp) uses it too.
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

}  // namespace vitkern
