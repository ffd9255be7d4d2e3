// Depthwise convolution ops: argument checks, allocation and dtype dispatch around the kernels of
// depthwise_conv_kernels.cuh. Built by nvcc into vitkern._C (CUDA tensors) and, through
// emulation/depthwise_conv.cpp, by the host compiler into vitkern._emulation (CPU tensors).
#include "depthwise_conv.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include "depthwise_conv_kernels.cuh"
#include "host.h"

namespace vitkern {
namespace dwconv {
template <>
struct Spelling<at::Half> {
  static std::string get() { return "c10::Half"; }
};
template <>
struct Spelling<at::BFloat16> {
  static std::string get() { return "c10::BFloat16"; }
};
}  // namespace dwconv

namespace {

namespace dw = dwconv;
constexpr int64_t kMaxKernel = 63;
constexpr int64_t kMaxGridYZ = 65535;  // CUDA's limit on gridDim.y and gridDim.z: batch and channel blocks

using host::DeviceGuard;
using host::stream_for;

at::MemoryFormat memory_format_of(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast) ? at::MemoryFormat::ChannelsLast
                                                                                 : at::MemoryFormat::Contiguous;
}

dw::Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// t laid out exactly like `like` (same shape and strides), copying only when it is not.
at::Tensor laid_out_like(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides()) {
    return t;
  }
  return at::empty_like(like).copy_(t);
}

void check_float_tensor(const char* name, const at::Tensor& t, const at::Tensor& x) { host::check_like(name, t, "x", x); }

void check_vector(const char* name, const std::optional<at::Tensor>& t, const at::Tensor& x) {
  if (t.has_value()) {
    check_float_tensor(name, *t, x);
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == x.size(1), name, ": expected shape (", x.size(1), ",), got ",
                t->sizes());
  }
}

template <typename scalar_t>
const scalar_t* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<scalar_t>() : nullptr;
}

// Checks the convolution arguments for an input of x_sizes (N, C, H, W) and a kh x kw kernel, named `kernel_arg`
// in messages; returns the geometry (output size included).
dw::Geometry conv_geometry(at::IntArrayRef x_sizes, int64_t kh, int64_t kw, const char* kernel_arg,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                           int64_t activation) {
  TORCH_CHECK_VALUE(x_sizes.size() == 4, "x: expected a 4-D tensor (N, C, H, W), got shape ", x_sizes);
  TORCH_CHECK_VALUE(x_sizes[0] >= 0 && x_sizes[1] >= 0 && x_sizes[2] >= 0 && x_sizes[3] >= 0,
                    "x: expected sizes >= 0, got shape ", x_sizes);
  TORCH_CHECK_VALUE(x_sizes[0] <= kMaxGridYZ && x_sizes[1] <= kMaxGridYZ, "x: expected batch and channels <= ",
                    kMaxGridYZ, ", got shape ", x_sizes);
  TORCH_CHECK_VALUE(kh >= 1 && kh <= kMaxKernel && kw >= 1 && kw <= kMaxKernel, kernel_arg,
                    ": expected kernel sizes from 1 to ", kMaxKernel, ", got ", kh, "x", kw);
  TORCH_CHECK_VALUE(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, "stride: expected [sh, sw] >= 1, got ",
              stride);
  TORCH_CHECK_VALUE(dilation.size() == 2 && dilation[0] >= 1 && dilation[1] >= 1,
              "dilation: expected [dh, dw] >= 1, got ", dilation);
  TORCH_CHECK_VALUE(padding.size() == 4 && padding[0] >= 0 && padding[1] >= 0 && padding[2] >= 0 && padding[3] >= 0,
              "padding: expected [top, bottom, left, right] >= 0, got ", padding);
  TORCH_CHECK_VALUE(activation >= dw::kNone && activation <= dw::kRelu,
              "activation: expected 0 (none), 1 (gelu) or 2 (relu), got ", activation);
  dw::Geometry g{};
  g.n = x_sizes[0];
  g.c = x_sizes[1];
  g.h = x_sizes[2];
  g.w = x_sizes[3];
  g.kh = static_cast<int>(kh);
  g.kw = static_cast<int>(kw);
  g.sh = static_cast<int>(stride[0]);
  g.sw = static_cast<int>(stride[1]);
  g.dh = static_cast<int>(dilation[0]);
  g.dw = static_cast<int>(dilation[1]);
  g.pad_top = static_cast<int>(padding[0]);
  g.pad_left = static_cast<int>(padding[2]);
  g.oh = (g.h + padding[0] + padding[1] - static_cast<int64_t>(g.dh) * (g.kh - 1) - 1) / g.sh + 1;
  g.ow = (g.w + padding[2] + padding[3] - static_cast<int64_t>(g.dw) * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK_VALUE(g.h + padding[0] + padding[1] > static_cast<int64_t>(g.dh) * (g.kh - 1) &&
                  g.w + padding[2] + padding[3] > static_cast<int64_t>(g.dw) * (g.kw - 1),
              "x: spatial size ", g.h, "x", g.w, " with padding ", padding, " is smaller than the dilated kernel ",
              g.kh, "x", g.kw, " (dilation ", dilation, ")");
  return g;
}

// Checks x, weight and the convolution arguments; returns the geometry (output size included).
dw::Geometry check_conv(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, int64_t activation) {
  host::check_storage_tensor("x", x);
  TORCH_CHECK_VALUE(x.dim() == 4, "x: expected a 4-D tensor (N, C, H, W), got shape ", x.sizes());
  check_float_tensor("weight", weight, x);
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(0) == x.size(1) && weight.size(1) == 1, "weight: expected shape (",
              x.size(1), ", 1, kh, kw), got ", weight.sizes());
  return conv_geometry(x.sizes(), weight.size(2), weight.size(3), "weight", stride, padding, dilation, activation);
}

// The strides the ops give x of `sizes` allocated NCHW or channels_last: x.contiguous(memory_format_of(x)).
dw::Strides dense_strides(at::IntArrayRef sizes, bool channels_last) {
  const at::MemoryFormat fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = at::empty(sizes, at::TensorOptions().device(at::kMeta).memory_format(fmt));
  return strides_of(x.contiguous(memory_format_of(x)));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> depthwise_conv2d_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias,
                                                        const std::optional<at::Tensor>& scale,
                                                        const std::optional<at::Tensor>& shift,
                                                        const std::optional<at::Tensor>& residual,
                                                        at::IntArrayRef stride, at::IntArrayRef padding,
                                                        at::IntArrayRef dilation, int64_t activation, bool save_z) {
  const dw::Geometry g = check_conv(x, weight, stride, padding, dilation, activation);
  check_vector("bias", bias, x);
  check_vector("scale", scale, x);
  check_vector("shift", shift, x);
  const at::MemoryFormat fmt = memory_format_of(x);
  const at::Tensor xc = x.contiguous(fmt);
  const at::Tensor wc = weight.contiguous();
  const std::optional<at::Tensor> bc = bias.has_value() ? std::optional(bias->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> sc = scale.has_value() ? std::optional(scale->contiguous()) : std::nullopt;
  const std::optional<at::Tensor> tc = shift.has_value() ? std::optional(shift->contiguous()) : std::nullopt;
  at::Tensor y = at::empty({g.n, g.c, g.oh, g.ow}, x.options().memory_format(fmt));
  at::Tensor z = save_z ? at::empty_like(y) : at::empty({0}, x.options());
  std::optional<at::Tensor> rc;
  if (residual.has_value()) {
    check_float_tensor("residual", *residual, x);
    TORCH_CHECK_VALUE(residual->sizes() == y.sizes(), "residual: expected shape ", y.sizes(), " (the output's), got ",
                residual->sizes());
    rc = laid_out_like(residual->contiguous(fmt), y);
  }
  if (y.numel() == 0) {
    return {y, z};
  }
  const DeviceGuard guard(x);
  VITKERN_DISPATCH_FLOAT_TYPES(x.scalar_type(), "depthwise_conv2d_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dw::launch_fwd<scalar_t, acc_t>(xc.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(),
                                    data_or_null<scalar_t>(bc), data_or_null<scalar_t>(sc),
                                    data_or_null<scalar_t>(tc), data_or_null<scalar_t>(rc),
                                    y.mutable_data_ptr<scalar_t>(), save_z ? z.mutable_data_ptr<scalar_t>() : nullptr,
                                    g, strides_of(xc), strides_of(y), static_cast<int>(activation), stream_for(x));
  });
  return {y, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> depthwise_conv2d_bwd(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& z,
    const std::optional<at::Tensor>& scale, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t activation, std::array<bool, 5> output_mask) {
  const dw::Geometry g = check_conv(x, weight, stride, padding, dilation, activation);
  check_vector("scale", scale, x);
  check_float_tensor("dy", dy, x);
  const std::vector<int64_t> out_shape{g.n, g.c, g.oh, g.ow};
  TORCH_CHECK_VALUE(dy.sizes() == at::IntArrayRef(out_shape), "dy: expected shape ", at::IntArrayRef(out_shape),
              " (the output's), got ", dy.sizes());
  const bool want_dx = output_mask[0], want_dweight = output_mask[1], want_dbias = output_mask[2],
             want_dscale = output_mask[3], want_dshift = output_mask[4];
  TORCH_CHECK_VALUE(!want_dscale || scale.has_value(),
                    "scale: expected a tensor when dscale is asked for (output_mask[3]), got None");
  const bool needs_z = activation != dw::kNone || want_dscale;
  if (needs_z) {
    check_float_tensor("z", z, x);
    TORCH_CHECK_VALUE(z.sizes() == at::IntArrayRef(out_shape), "z: expected shape ", at::IntArrayRef(out_shape),
                " (the forward's z, saved with save_z) when activation != 0 or dscale is asked for, got ", z.sizes());
  }
  const at::MemoryFormat fmt = memory_format_of(x);
  const at::Tensor xc = x.contiguous(fmt);
  const at::Tensor wc = weight.contiguous();
  const at::Tensor dyc = dy.contiguous(fmt);
  const at::Tensor zc = needs_z ? laid_out_like(z.contiguous(fmt), dyc) : z;
  const std::optional<at::Tensor> sc = scale.has_value() ? std::optional(scale->contiguous()) : std::nullopt;
  const bool want_sums = want_dbias || want_dscale || want_dshift;
  const int64_t taps = static_cast<int64_t>(g.kh) * g.kw;

  at::Tensor dx = want_dx ? at::empty(x.sizes(), x.options().memory_format(fmt)) : at::empty({0}, x.options());
  const at::TensorOptions acc_options = x.options().dtype(at::kFloat);
  at::Tensor dweight_acc = at::zeros({want_dweight ? g.c : 0, taps}, acc_options);
  at::Tensor sums_acc = at::zeros({want_sums ? g.c : 0, dw::kEpilogueSums}, acc_options);
  const bool empty_output = g.n == 0 || g.c == 0;
  if (!empty_output && (want_dx || want_dweight || want_sums)) {
    const DeviceGuard guard(x);
    VITKERN_DISPATCH_FLOAT_TYPES(x.scalar_type(), "depthwise_conv2d_bwd", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      static_assert(std::is_same_v<acc_t, float>, "partials are allocated as float32");
      const dw::GradSource<scalar_t, acc_t> grad{dyc.const_data_ptr<scalar_t>(),
                                                 needs_z ? zc.const_data_ptr<scalar_t>() : nullptr,
                                                 data_or_null<scalar_t>(sc), static_cast<int>(activation)};
      const cudaStream_t stream = stream_for(x);
      if (want_dx && dx.numel() > 0) {
        // The window kernels read dz (computed first, into a buffer like dy, where the epilogue needs it) or dy.
        const dw::ConvLaunch window = dw::plan_dx<scalar_t, acc_t>(g, strides_of(xc), strides_of(dyc), true);
        const bool needs_dz = dw::dx_needs_dz(window, grad);
        const dw::ConvLaunch l = needs_dz ? window
                                          : dw::plan_dx<scalar_t, acc_t>(g, strides_of(xc), strides_of(dyc),
                                                                         dw::aligned16(dyc.const_data_ptr<scalar_t>()));
        at::Tensor dz = needs_dz ? at::empty_like(dyc) : at::empty({0}, x.options());
        dw::launch_dx<scalar_t, acc_t>(l, grad, needs_dz ? dz.mutable_data_ptr<scalar_t>() : nullptr,
                                       wc.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), g,
                                       strides_of(xc), strides_of(dyc), stream);
      }
      if (want_dweight || want_sums) {
        const dw::DweightPlan plan =
            dw::plan_dweight<scalar_t, acc_t>(g, strides_of(xc), dw::aligned16(xc.const_data_ptr<scalar_t>()));
        TORCH_CHECK_VALUE(plan.fits(g), "x: shape ", x.sizes(), " with a ", g.kh, "x", g.kw,
                          " kernel is too large for the weight-gradient kernel's 32-bit indexing");
        const at::Tensor partial_w = at::empty({want_dweight ? g.c * plan.blocks_g * taps : 0}, acc_options);
        const at::Tensor partial_sums =
            at::empty({want_sums ? g.c * plan.blocks_g * dw::kEpilogueSums : 0}, acc_options);
        dw::launch_dweight<scalar_t, acc_t>(
            plan, grad, xc.const_data_ptr<scalar_t>(), want_dweight ? partial_w.mutable_data_ptr<acc_t>() : nullptr,
            want_sums ? partial_sums.mutable_data_ptr<acc_t>() : nullptr,
            want_dweight ? dweight_acc.mutable_data_ptr<acc_t>() : nullptr,
            want_sums ? sums_acc.mutable_data_ptr<acc_t>() : nullptr, g, strides_of(xc), strides_of(dyc), stream);
      }
    });
  }
  // Gradients not asked for are distinct empty tensors (outputs of a custom op must not alias each other).
  auto none = [&] { return at::empty({0}, weight.options()); };
  auto sum = [&](bool wanted, int64_t index) {
    // copy=true: a fresh contiguous tensor per gradient, even where the select is already one (a single channel).
    return wanted ? sums_acc.select(1, index).to(weight.scalar_type(), /*non_blocking=*/false, /*copy=*/true,
                                                 at::MemoryFormat::Contiguous)
                  : none();
  };
  at::Tensor dweight = want_dweight ? dweight_acc.view({g.c, 1, g.kh, g.kw}).to(weight.scalar_type()) : none();
  return {dx, dweight, sum(want_dbias, 0), sum(want_dscale, 1), sum(want_dshift, 2)};
}

std::vector<std::string> depthwise_conv2d_plan(at::IntArrayRef x_shape, bool channels_last, std::string_view dtype,
                                               at::IntArrayRef kernel, at::IntArrayRef stride,
                                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t activation,
                                               std::string_view direction) {
  TORCH_CHECK_VALUE(kernel.size() == 2, "kernel: expected [kh, kw], got ", kernel);
  const dw::Geometry g = conv_geometry(x_shape, kernel[0], kernel[1], "kernel", stride, padding, dilation, activation);
  at::ScalarType type;
  if (dtype == "float32") {
    type = at::kFloat;
  } else if (dtype == "float16") {
    type = at::kHalf;
  } else {
    TORCH_CHECK_VALUE(dtype == "bfloat16", "dtype: expected \"float32\", \"float16\" or \"bfloat16\", got \"",
                      dtype, "\"");
    type = at::kBFloat16;
  }
  TORCH_CHECK_VALUE(direction == "fwd" || direction == "dx" || direction == "dweight",
                    "direction: expected \"fwd\", \"dx\" or \"dweight\", got \"", direction, "\"");
  std::vector<std::string> launches;
  if (g.n == 0 || g.c == 0 || g.oh == 0 || g.ow == 0) {
    return launches;
  }
  const dw::Strides sx = dense_strides(x_shape, channels_last);
  VITKERN_DISPATCH_FLOAT_TYPES(type, "depthwise_conv2d_plan", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (direction == "fwd") {
      launches = dw::describe_fwd<scalar_t, acc_t>(g, sx);
    } else if (direction == "dx") {
      launches = dw::describe_dx<scalar_t, acc_t>(g, sx, static_cast<int>(activation));
    } else {
      launches = dw::describe_dweight<scalar_t, acc_t>(g, sx);
    }
  });
  return launches;
}

}  // namespace vitkern
