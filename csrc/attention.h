// The attention ops of csrc/attention.cu, registered by csrc/ops.cpp. Contract: the docstring of
// vitkern/ops/attention.py (attention_fwd / attention_bwd, bias modes 0-3, the optional Swin window mask).
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace vitkern {

// out = softmax(scale * q @ k^T + bias + mask) @ v and lse = logsumexp of the scores per query row.
// q: (B, H, Nq, D), k: (B, H, Nk, D), v: (B, H, Nk, Dv), D and Dv <= 128. bias_mode 0: none; 1: table
// ((2Wh-1)(2Ww-1), H), geometry [Wh, Ww]; 2: LeViT biases (H, R*R), geometry [R, stride]; 3: a 4-D bias
// broadcastable to (B, H, Nq, Nk). mask: (num_windows, Nq, Nk) added to batch entry b as mask[b % num_windows].
// Returns out (B, H, Nq, Dv) in q's dtype and lse (B, H, Nq) fp32 (-inf on a row whose every score is -inf).
std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const std::optional<at::Tensor>& bias,
                                                 const std::optional<at::Tensor>& mask, int64_t bias_mode,
                                                 at::IntArrayRef geometry, double scale);

// Gradients (dq, dk, dv, dbias) of attention_fwd for dout = dL/dout; dbias has the bias's shape, an empty tensor
// when bias_grad is false. Deterministic: no float atomics, every sum in a fixed order.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask,
    int64_t bias_mode, at::IntArrayRef geometry, double scale, bool bias_grad);

}  // namespace vitkern
