// The depthwise-convolution ops of csrc/depthwise_conv.cu, registered by csrc/ops.cpp. Contract: the docstring of
// vitkern/ops/depthwise_conv.py.
#pragma once

#include <array>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>

namespace vitkern {

// y = act(conv(x, weight) + bias) * scale + shift + residual; z = conv + bias when save_z (else empty).
// x: (N, C, H, W) NCHW or channels_last; weight: (C, 1, kh, kw); bias, scale, shift: (C,); residual: y's shape.
// stride, dilation: [sh, sw]; padding: [top, bottom, left, right]; activation: 0 none, 1 gelu (erf), 2 relu.
// Returns (y, z), (N, C, OH, OW) in x's dtype and memory format.
std::tuple<at::Tensor, at::Tensor> depthwise_conv2d_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias,
                                                        const std::optional<at::Tensor>& scale,
                                                        const std::optional<at::Tensor>& shift,
                                                        const std::optional<at::Tensor>& residual,
                                                        at::IntArrayRef stride, at::IntArrayRef padding,
                                                        at::IntArrayRef dilation, int64_t activation, bool save_z);

// Gradients (dx, dweight, dbias, dscale, dshift) of depthwise_conv2d_fwd for dy = dL/dy; those not asked for in
// output_mask come back empty. z: the forward's z (needed when activation != 0 or dscale is asked for).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> depthwise_conv2d_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& z,
    const std::optional<at::Tensor>& scale, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t activation, std::array<bool, 5> output_mask);

// The kernel launches depthwise_conv2d_fwd ("fwd") or depthwise_conv2d_bwd makes for an x of x_shape (N, C, H, W),
// NCHW or channels_last, 16-byte aligned, of dtype "float32" | "float16" | "bfloat16": "dx" the input gradient
// alone, "dweight" the weight gradient alone. kernel: [kh, kw]; the other arguments as for depthwise_conv2d_fwd.
// One string per launch, in launch order: "<kernel name>|gx,gy,gz|bx,by,bz|dynamic_smem_bytes", the kernel's name
// demangled as cu++filt prints its symbol in vitkern._C.
std::vector<std::string> depthwise_conv2d_plan(at::IntArrayRef x_shape, bool channels_last, std::string_view dtype,
                                               at::IntArrayRef kernel, at::IntArrayRef stride,
                                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t activation,
                                               std::string_view direction);

}  // namespace vitkern
