// Attention ops: argument checks, allocation and dtype dispatch around the kernels of attention_kernels.cuh.
// Built by nvcc into vitkern._C (CUDA tensors) and, through emulation/attention.cpp, by the host compiler into
// vitkern._emulation (CPU tensors).
#include "attention.h"

#include <limits>

#include <ATen/ATen.h>

#include "attention_kernels.cuh"
#include "host.h"

namespace vitkern {
namespace {

// Bounds on the fp32 gradient buffers of the backward (see attention_bwd): the table partials
// (chunks, key tiles, H, entries) and the dense-bias buffer (chunks, H, Nq, Nk) of a batch-broadcast bias.
constexpr int64_t kTablePartialBytes = 16ll << 20;
constexpr int64_t kDenseBufferBytes = 64ll << 20;
constexpr int64_t kMaxTokens = std::numeric_limits<int>::max();

using host::DeviceGuard;
using host::stream_for;

void check_like_q(const char* name, const at::Tensor& t, const at::Tensor& q) { host::check_like(name, t, "q", q); }

void check_shape(const char* name, const at::Tensor& t, at::IntArrayRef expected) {
  TORCH_CHECK_VALUE(t.sizes() == expected, name, ": expected shape ", expected, ", got ", t.sizes());
}

// Checks every argument of the forward and returns the kernel parameters (data pointers left to the caller).
template <typename scalar_t>
attn::Params<scalar_t> check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask,
                                  int64_t bias_mode, at::IntArrayRef geometry, double scale) {
  TORCH_CHECK_VALUE(q.dim() == 4, "q: expected a 4-D tensor (B, H, Nq, D), got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4 && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
                    "k: expected shape (", q.size(0), ", ", q.size(1), ", Nk, ", q.size(3), "), got ", k.sizes());
  TORCH_CHECK_VALUE(v.dim() == 4 && v.size(0) == k.size(0) && v.size(1) == k.size(1) && v.size(2) == k.size(2),
                    "v: expected shape (", k.size(0), ", ", k.size(1), ", ", k.size(2), ", Dv), got ", v.sizes());
  TORCH_CHECK_VALUE(q.size(3) >= 1 && q.size(3) <= attn::kMaxHeadDim, "q: expected head dim from 1 to ",
                    attn::kMaxHeadDim, " (the CUDA C++ attention kernels), got ", q.size(3));
  TORCH_CHECK_VALUE(v.size(3) >= 1 && v.size(3) <= attn::kMaxHeadDim, "v: expected head dim from 1 to ",
                    attn::kMaxHeadDim, " (the CUDA C++ attention kernels), got ", v.size(3));
  TORCH_CHECK_VALUE(q.size(2) <= kMaxTokens && k.size(2) <= kMaxTokens, "k: expected at most ", kMaxTokens,
                    " tokens, got ", q.size(2), " queries and ", k.size(2), " keys");
  attn::Params<scalar_t> p{};
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.nq = q.size(2);
  p.nk = k.size(2);
  p.d = static_cast<int>(q.size(3));
  p.dv = static_cast<int>(v.size(3));
  p.scale = static_cast<float>(scale);
  p.bias_mode = static_cast<int>(bias_mode);
  p.num_windows = 1;
  TORCH_CHECK_VALUE(bias_mode >= attn::kBiasNone && bias_mode <= attn::kBiasDense,
                    "bias_mode: expected 0 (none), 1 (table), 2 (LeViT biases) or 3 (dense), got ", bias_mode);
  TORCH_CHECK_VALUE(bias_mode == attn::kBiasNone || bias.has_value(), "bias: expected a tensor for bias_mode ",
                    bias_mode, ", got None");
  if (bias_mode == attn::kBiasRelPos || bias_mode == attn::kBiasLevit) {
    TORCH_CHECK_VALUE(geometry.size() == 2 && geometry[0] >= 1 && geometry[1] >= 1, "geometry: expected [",
                      bias_mode == attn::kBiasRelPos ? "Wh, Ww" : "R, stride", "] >= 1, got ", geometry);
    p.geo0 = static_cast<int>(geometry[0]);
    p.geo1 = static_cast<int>(geometry[1]);
  }
  if (bias_mode == attn::kBiasRelPos) {
    const int64_t wh = geometry[0], ww = geometry[1];
    check_shape("q", q, {p.batch, p.heads, wh * ww, p.d});
    check_shape("k", k, {p.batch, p.heads, wh * ww, p.d});
    check_like_q("bias", *bias, q);
    check_shape("bias", *bias, {(2 * wh - 1) * (2 * ww - 1), p.heads});
  } else if (bias_mode == attn::kBiasLevit) {
    const int64_t r = geometry[0], rq = (geometry[0] - 1) / geometry[1] + 1;
    check_shape("q", q, {p.batch, p.heads, rq * rq, p.d});
    check_shape("k", k, {p.batch, p.heads, r * r, p.d});
    check_like_q("bias", *bias, q);
    check_shape("bias", *bias, {p.heads, r * r});
  } else if (bias_mode == attn::kBiasDense) {
    check_like_q("bias", *bias, q);
    const int64_t full[4] = {p.batch, p.heads, p.nq, p.nk};
    bool ok = bias->dim() == 4;
    for (int64_t dim = 0; ok && dim < 4; ++dim) {
      ok = bias->size(dim) == 1 || bias->size(dim) == full[dim];
    }
    TORCH_CHECK_VALUE(ok, "bias: expected a 4-D shape broadcastable to ", at::IntArrayRef(full), ", got ",
                      bias->sizes());
  }
  if (bias_mode != attn::kBiasNone) {
    const at::Tensor& t = *bias;
    p.bias_s0 = t.size(0) == 1 && bias_mode == attn::kBiasDense ? 0 : t.stride(0);
    p.bias_s1 = t.size(1) == 1 && bias_mode == attn::kBiasDense ? 0 : t.stride(1);
    if (bias_mode == attn::kBiasDense) {
      p.bias_s2 = t.size(2) == 1 ? 0 : t.stride(2);
      p.bias_s3 = t.size(3) == 1 ? 0 : t.stride(3);
    }
  }
  if (mask.has_value()) {
    check_like_q("mask", *mask, q);
    TORCH_CHECK_VALUE(mask->dim() == 3 && mask->size(0) >= 1 && mask->size(1) == p.nq && mask->size(2) == p.nk,
                      "mask: expected shape (num_windows, ", p.nq, ", ", p.nk, "), got ", mask->sizes());
    TORCH_CHECK_VALUE(mask->is_contiguous(), "mask: expected a contiguous tensor, got strides ", mask->strides());
    TORCH_CHECK_VALUE(p.batch % mask->size(0) == 0, "mask: expected num_windows dividing the batch ", p.batch,
                      ", got ", mask->size(0));
    p.num_windows = mask->size(0);
  }
  return p;
}

void check_qkv_dtype_device(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  host::check_storage_tensor("q", q);
  check_like_q("k", k, q);
  check_like_q("v", v, q);
}

template <typename scalar_t>
void set_pointers(attn::Params<scalar_t>& p, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& mask) {
  p.bias = p.bias_mode == attn::kBiasNone ? nullptr : bias->const_data_ptr<scalar_t>();
  p.mask = mask.has_value() ? mask->const_data_ptr<scalar_t>() : nullptr;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const std::optional<at::Tensor>& bias,
                                                 const std::optional<at::Tensor>& mask, int64_t bias_mode,
                                                 at::IntArrayRef geometry, double scale) {
  check_qkv_dtype_device(q, k, v);
  at::Tensor out, lse;
  VITKERN_DISPATCH_FLOAT_TYPES(q.scalar_type(), "attention_fwd", [&] {
    attn::Params<scalar_t> p = check_args<scalar_t>(q, k, v, bias, mask, bias_mode, geometry, scale);
    out = at::empty({p.batch, p.heads, p.nq, p.dv}, q.options());
    lse = at::empty({p.batch, p.heads, p.nq}, q.options().dtype(at::kFloat));
    if (out.numel() == 0 && lse.numel() == 0) {
      return;
    }
    if (p.nk == 0) {
      out.zero_();
      lse.fill_(-std::numeric_limits<float>::infinity());
      return;
    }
    const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
    set_pointers(p, bias, mask);
    const DeviceGuard guard(q);
    attn::launch_fwd<scalar_t>(p, qc.const_data_ptr<scalar_t>(), kc.const_data_ptr<scalar_t>(),
                               vc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                               lse.mutable_data_ptr<float>(), stream_for(q));
  });
  return {out, lse};
}

// Buffers: dq partials (key tiles, B, H, Nq, D) fp32, summed over key tiles in order (one key tile up to
// kMaxResidentKeys keys when the shared memory allows). Table gradient: partials (chunks, key tiles, H, entries)
// fp32 with chunks = min(B, kTablePartialBytes / (key tiles * H * entries * 4)), each chunk a run of
// ceil(B / chunks) batch entries. Dense-bias gradient: (chunks, H, Nq, Nk) fp32, chunks = B when the bias has the
// batch dim, else min(B, kDenseBufferBytes / (H * Nq * Nk * 4)) (at least 1); the broadcast dims are then summed.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& mask,
    int64_t bias_mode, at::IntArrayRef geometry, double scale, bool bias_grad) {
  check_qkv_dtype_device(q, k, v);
  TORCH_CHECK_VALUE(!bias_grad || bias_mode != attn::kBiasNone, "bias_grad: expected false for bias_mode 0, got true");
  at::Tensor dq, dk, dv, dbias = at::empty({0}, q.options());
  VITKERN_DISPATCH_FLOAT_TYPES(q.scalar_type(), "attention_bwd", [&] {
    attn::Params<scalar_t> p = check_args<scalar_t>(q, k, v, bias, mask, bias_mode, geometry, scale);
    check_like_q("dout", dout, q);
    check_shape("dout", dout, {p.batch, p.heads, p.nq, p.dv});
    check_like_q("out", out, q);
    check_shape("out", out, {p.batch, p.heads, p.nq, p.dv});
    host::check_device("lse", lse);
    TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, "lse: expected dtype float32, got ", lse.scalar_type());
    check_shape("lse", lse, {p.batch, p.heads, p.nq});
    dk = at::empty(k.sizes(), k.options());
    dv = at::empty(v.sizes(), v.options());
    const attn::BwdLayout layout = attn::plan_bwd<scalar_t>(p.nk, p.d, p.dv);
    const at::TensorOptions f32 = q.options().dtype(at::kFloat);
    const int64_t pairs = p.batch * p.heads;
    int64_t chunks = p.batch;
    at::Tensor table_partial, dense_grad;
    if (bias_grad && (bias_mode == attn::kBiasRelPos || bias_mode == attn::kBiasLevit)) {
      const int64_t entries = attn::table_entries(p.bias_mode, p.geo0, p.geo1);
      const int64_t per_chunk = layout.key_tiles * p.heads * entries * static_cast<int64_t>(sizeof(float));
      chunks = std::clamp<int64_t>(kTablePartialBytes / std::max<int64_t>(per_chunk, 1), 1, std::max<int64_t>(p.batch, 1));
      table_partial = at::zeros({chunks, layout.key_tiles, p.heads, entries}, f32);
    } else if (bias_grad) {
      if (bias->size(0) == 1) {
        const int64_t per_chunk = p.heads * p.nq * p.nk * static_cast<int64_t>(sizeof(float));
        chunks = std::clamp<int64_t>(kDenseBufferBytes / std::max<int64_t>(per_chunk, 1), 1, std::max<int64_t>(p.batch, 1));
      }
      dense_grad = at::zeros({chunks, p.heads, p.nq, p.nk}, f32);
    }
    chunks = std::max<int64_t>(chunks, 1);
    const int64_t batch_per_chunk = (p.batch + chunks - 1) / chunks;
    at::Tensor dq_partial = at::zeros({layout.key_tiles, p.batch, p.heads, p.nq, p.d}, f32);
    if (pairs > 0 && p.nq > 0 && p.nk > 0) {
      const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), oc = out.contiguous(),
                       doc = dout.contiguous(), lc = lse.contiguous();
      set_pointers(p, bias, mask);
      const DeviceGuard guard(q);
      attn::launch_bwd<scalar_t>(p, layout, chunks, batch_per_chunk, qc.const_data_ptr<scalar_t>(),
                                 kc.const_data_ptr<scalar_t>(), vc.const_data_ptr<scalar_t>(),
                                 oc.const_data_ptr<scalar_t>(), doc.const_data_ptr<scalar_t>(),
                                 lc.const_data_ptr<float>(), dq_partial.mutable_data_ptr<float>(),
                                 dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>(),
                                 table_partial.defined() ? table_partial.mutable_data_ptr<float>() : nullptr,
                                 dense_grad.defined() ? dense_grad.mutable_data_ptr<float>() : nullptr,
                                 stream_for(q));
    } else {
      dk.zero_();
      dv.zero_();
    }
    dq = (layout.key_tiles == 1 ? dq_partial.select(0, 0) : dq_partial.sum(0)).to(q.scalar_type());
    if (table_partial.defined()) {
      const at::Tensor per_head = table_partial.sum(at::IntArrayRef{0, 1});  // (H, entries)
      dbias = (bias_mode == attn::kBiasRelPos ? per_head.t() : per_head).contiguous().to(bias->scalar_type());
    } else if (dense_grad.defined()) {
      at::Tensor g = dense_grad;
      for (int64_t dim = 0; dim < 4; ++dim) {
        if (bias->size(dim) == 1 && g.size(dim) != 1) {
          g = g.sum(dim, /*keepdim=*/true);
        }
      }
      dbias = g.to(bias->scalar_type()).contiguous();
    }
  });
  return {dq, dk, dv, dbias};
}

}  // namespace vitkern
