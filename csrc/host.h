// Host-side helpers of the op files (attention.cu, depthwise_conv.cu): the device their tensors must be on, its
// stream, a device guard, and the dispatch over vitkern's storage dtypes. Under VITKERN_EMULATION (the emulation
// build, CPU tensors) the stream is null and the guard does nothing.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#ifndef VITKERN_EMULATION
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

// float, at::Half and at::BFloat16 (the storage dtypes vitkern supports), as scalar_t.
#define VITKERN_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                               \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)             \
                                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)          \
                                         AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

namespace vitkern::host {

#ifdef VITKERN_EMULATION
inline constexpr const char* kDeviceName = "cpu (the emulation build runs on CPU tensors)";
inline bool on_expected_device(const at::Tensor& t) { return t.is_cpu(); }
inline cudaStream_t stream_for(const at::Tensor&) { return nullptr; }
struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor&) {}
};
#else
inline constexpr const char* kDeviceName = "cuda";
inline bool on_expected_device(const at::Tensor& t) { return t.is_cuda(); }
inline cudaStream_t stream_for(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}
struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor& t) : guard(t.device()) {}
  c10::cuda::CUDAGuard guard;
};
#endif

// ValueError "<name>: expected a tensor on <device>, got device <t's>" unless t is on the build's device.
inline void check_device(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(on_expected_device(t), name, ": expected a tensor on ", kDeviceName, ", got device ", t.device());
}

// check_device, and TypeError unless t's dtype is float32, float16 or bfloat16 (vitkern's storage dtypes).
inline void check_storage_tensor(const char* name, const at::Tensor& t) {
  check_device(name, t);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
                   name, ": expected dtype float32, float16 or bfloat16, got ", t.scalar_type());
}

// check_device, and TypeError unless t has the dtype of `like` (the op's first input, called like_name).
inline void check_like(const char* name, const at::Tensor& t, const char* like_name, const at::Tensor& like) {
  check_device(name, t);
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), name, ": expected dtype ", like.scalar_type(), " (the dtype of ",
                   like_name, "), got ", t.scalar_type());
}

}  // namespace vitkern::host
