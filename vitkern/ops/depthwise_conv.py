"""``vitkern.ops.depthwise_conv2d``: depthwise convolution with a fused per-channel epilogue.

``y = act(conv(x, weight) + bias) * scale + shift + residual``. The public function checks its arguments, resolves
the backend and either runs plain PyTorch (``eager``, ``cpu``) or the custom op ``vitkern::depthwise_conv2d``,
whose forward and backward call one kernel family: Triton (:mod:`vitkern.kernels.depthwise_conv`) or the CUDA C++
kernels (``torch.ops.vitkern_cuda`` / ``torch.ops.vitkern_emu``, built from ``csrc/depthwise_conv.cu``).

Kernel contract (identical for every kernel family)::

    depthwise_conv2d_fwd(x, weight, bias, scale, shift, residual, stride, padding, dilation, activation, save_z)
        -> (y, z)
    depthwise_conv2d_bwd(dy, x, weight, z, scale, stride, padding, dilation, activation, output_mask)
        -> (dx, dweight, dbias, dscale, dshift)

x, residual, y, z, dy, dx: (N, C, H, W) all contiguous in x's memory format (NCHW or channels_last); weight
(C, 1, kh, kw) contiguous; bias, scale, shift (C,). stride, dilation: [sh, sw]; padding: [top, bottom, left, right];
activation: 0 none, 1 gelu (erf), 2 relu. z is the pre-activation ``conv + bias`` in x's dtype, returned only when
``save_z`` (else an empty tensor). output_mask says which of the five gradients to compute; the others come back
empty. Accumulation is fp32; the weight gradient is deterministic.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from vitkern import _tuning, reference
from vitkern._backend import resolve
from vitkern.ops._checks import check_like, check_shape, check_tensor, needs_grad, pair
from vitkern.reference.depthwise_conv import ACTIVATIONS, resolve_padding

ACTIVATION_CODES = {None: 0, "gelu": 1, "relu": 2}
MAX_KERNEL = 63
# Without a measured choice (small problems, deterministic mode, torch.compile; see vitkern._tuning) the CPU path
# converts an NCHW input to channels_last from this kernel width on: torch 2.14's NCHW depthwise forward falls off a
# cliff there on CPU (2x256x32x32: 13x13 3.3 ms NCHW against 11 ms converted; 15x15 59 ms against 10 ms).
CPU_NCHW_SLOW_KERNEL_WIDTH = 15


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is laid out that way (and not also plain contiguous), else contiguous_format."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def output_size(size: int, kernel: int, stride: int, pad_lo: int, pad_hi: int, dilation: int) -> int:
    return (size + pad_lo + pad_hi - dilation * (kernel - 1) - 1) // stride + 1


def _check_args(x, weight, bias, stride, padding, dilation, activation, scale, shift, residual):
    check_tensor("x", x, ndim=4)
    check_tensor("weight", weight, ndim=4)
    check_like("weight", weight, "x", x)
    batch, channels, height, width = x.shape
    weight_channels, weight_groups, kh, kw = weight.shape
    if weight_channels != channels or weight_groups != 1:
        raise ValueError(
            f"weight: expected shape ({channels}, 1, kh, kw) for a depthwise convolution of {channels} channels, "
            f"got {tuple(weight.shape)}"
        )
    if not (1 <= kh <= MAX_KERNEL and 1 <= kw <= MAX_KERNEL):
        raise ValueError(f"weight: expected kernel sizes from 1 to {MAX_KERNEL}, got {kh}x{kw}")
    stride = pair("stride", stride, 1)
    dilation = pair("dilation", dilation, 1)
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding: expected 'same', 'valid', an int or a pair of ints, got {padding!r}")
    else:
        pair("padding", padding, 0)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    pads = resolve_padding(padding, (kh, kw), dilation)
    out_h = output_size(height, kh, stride[0], pads[0], pads[1], dilation[0])
    out_w = output_size(width, kw, stride[1], pads[2], pads[3], dilation[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"x: input of spatial size {(height, width)} is smaller than the dilated kernel {kh}x{kw} "
            f"(dilation {dilation}) with padding {pads}: output would be {out_h}x{out_w}"
        )
    for name, vec in (("bias", bias), ("scale", scale), ("shift", shift)):
        if vec is not None:
            check_tensor(name, vec, ndim=1)
            check_like(name, vec, "x", x)
            check_shape(name, vec, (channels,))
    if residual is not None:
        check_tensor("residual", residual, ndim=4)
        check_like("residual", residual, "x", x)
        check_shape("residual", residual, (batch, channels, out_h, out_w))
    return stride, pads, dilation, (out_h, out_w)


def depthwise_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: str | int | tuple[int, int] = "same",
    dilation: int | tuple[int, int] = 1,
    activation: str | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Depthwise convolution with a fused epilogue: ``act(conv(x, weight) + bias) * scale + shift + residual``.

    Args:
        x: (N, C, H, W), NCHW or channels_last; the output keeps its memory format.
        weight: (C, 1, kh, kw) as in ``nn.Conv2d(C, C, k, groups=C)``; 1 <= kh, kw <= 63.
        bias, scale, shift: (C,) or None. ``scale``/``shift`` are applied after the activation (an inference
            BatchNorm folded into the epilogue, as in a ConvMixer block).
        stride, dilation: an int or a pair, >= 1.
        padding: "same" (``dilation * (k - 1)`` in total, the odd element bottom/right as ``F.conv2d`` does; with
            stride s the output is ceil(H / s)), "valid", an int or a pair.
        activation: None, "gelu" (erf) or "relu".
        residual: the output's shape, added last.

    Returns:
        (N, C, H_out, W_out) in x's dtype and memory format.
    """
    stride, pads, dilation, out_size = _check_args(
        x, weight, bias, stride, padding, dilation, activation, scale, shift, residual
    )
    impl = resolve("depthwise_conv2d", x.device, auto_gpu="cuda")
    if impl == "eager":
        return reference.depthwise_conv2d(
            x, weight, bias, stride, padding, dilation, activation, scale, shift, residual
        )
    if impl == "cpu":
        return _cpu_forward(x, weight, bias, stride, pads, dilation, out_size, activation, scale, shift, residual)
    fmt = memory_format(x)
    save_z = (activation is not None or scale is not None) and needs_grad(x, weight, bias, scale, shift, residual)
    y, _ = torch.ops.vitkern.depthwise_conv2d(
        x.contiguous(memory_format=fmt),
        weight.contiguous(),
        *(None if vec is None else vec.contiguous() for vec in (bias, scale, shift)),
        None if residual is None else residual.contiguous(memory_format=fmt),
        list(stride),
        list(pads),
        list(dilation),
        ACTIVATION_CODES[activation],
        save_z,
        impl,
    )
    return y


def _cpu_forward(x, weight, bias, stride, pads, dilation, out_size, activation, scale, shift, residual):
    """The ``auto`` path on CPU tensors: F.conv2d, then the plain epilogue on the fresh output (never on an input).

    The convolution runs in whichever memory format is faster for this problem, forward and backward chosen apart
    (vitkern._tuning measures both formats once per signature); the output keeps x's format. Without gradients the
    epilogue runs in place on the convolution's output.
    """
    fmt = memory_format(x)
    top, bottom, left, right = pads
    if top != bottom or left != right:
        x = F.pad(x, (left, right, top, bottom))
        top = left = 0
    conv = _CPUConv(x, weight, bias, stride, (top, left), dilation, out_size, fmt)
    if not needs_grad(x, weight, bias, scale, shift, residual):
        return _epilogue_in_place(conv.run(conv.forward_format(backward=False)), activation, scale, shift, residual)
    forward_fmt = conv.forward_format(backward=True)
    backward_fmt = conv.backward_format(forward_fmt)
    if backward_fmt == forward_fmt:
        z = conv.run(forward_fmt)
    else:
        z = _ConvWithBackwardFormat.apply(x, weight, bias, conv.geometry(), forward_fmt, backward_fmt)
    return reference.depthwise_conv2d_epilogue(z, activation, scale, shift, residual)


_FORMAT_NAMES = {torch.contiguous_format: "nchw", torch.channels_last: "channels_last"}
_FORMATS = {name: fmt for fmt, name in _FORMAT_NAMES.items()}


class _CPUConv:
    """One depthwise F.conv2d problem on CPU (symmetric padding) whose forward or backward runs in a chosen memory
    format; tensors go in and come out in x's own format."""

    def __init__(self, x, weight, bias, stride, padding, dilation, out_size, fmt):
        self.x, self.weight, self.bias = x, weight, bias
        self.stride, self.padding, self.dilation, self.out_size, self.fmt = stride, padding, dilation, out_size, fmt

    def geometry(self):
        """Everything but the tensors, to rebuild the problem on other tensors of the same shape."""
        return self.stride, self.padding, self.dilation, self.out_size, self.fmt

    def run(self, conv_fmt):
        """conv(x) + bias, computed in ``conv_fmt``, returned in x's format."""
        x = self.x
        z = F.conv2d(
            x.contiguous(memory_format=conv_fmt), self.weight, self.bias, self.stride, self.padding, self.dilation,
            x.shape[1],
        )
        return z.contiguous(memory_format=self.fmt)

    def run_backward(self, conv_fmt, dz, output_mask):
        """(dx, dweight, dbias) of ``run`` for the output gradient dz, computed in ``conv_fmt``; dx in x's format."""
        x = self.x
        dx, dweight, dbias = torch.ops.aten.convolution_backward(
            dz.contiguous(memory_format=conv_fmt),
            x.contiguous(memory_format=conv_fmt),
            self.weight,
            [x.shape[1]] if output_mask[2] else None,
            list(self.stride),
            list(self.padding),
            list(self.dilation),
            False,
            [0, 0],
            x.shape[1],
            list(output_mask),
        )
        if dx is not None:
            dx = dx.contiguous(memory_format=self.fmt)
        return dx, dweight, dbias

    def _tuning_key(self, direction, backward=True):
        """The measured choice's key, or None where the problem keeps the default (see vitkern._tuning)."""
        batch, channels = self.x.shape[:2]
        kh, kw = self.weight.shape[2:]
        if not _tuning.worth_tuning(batch * channels * self.out_size[0] * self.out_size[1] * kh * kw, backward):
            return None
        return (
            "depthwise_conv2d", direction, tuple(self.x.shape), (kh, kw), self.stride, self.padding, self.dilation,
            self.x.dtype, self.fmt, self.bias is not None, torch.get_num_threads(),
        )

    def forward_format(self, backward):
        default = self.fmt
        if default == torch.contiguous_format and self.weight.shape[3] >= CPU_NCHW_SLOW_KERNEL_WIDTH:
            default = torch.channels_last
        key = self._tuning_key("forward", backward)
        if key is None:
            return default

        def candidates():
            return {name: (lambda f=f: self.run(f)) for name, f in _FORMATS.items()}

        return _FORMATS[_tuning.choose(key, candidates, _FORMAT_NAMES[default])]

    def backward_format(self, forward_fmt):
        key = self._tuning_key("backward")
        if key is None:
            return forward_fmt

        def candidates():
            dz = self.x.new_ones((*self.x.shape[:2], *self.out_size)).contiguous(memory_format=self.fmt)
            mask = (True, True, self.bias is not None)
            return {name: (lambda f=f: self.run_backward(f, dz, mask)) for name, f in _FORMATS.items()}

        return _FORMATS[_tuning.choose(key, candidates, _FORMAT_NAMES[forward_fmt])]


class _ConvWithBackwardFormat(torch.autograd.Function):
    """conv(x) + bias with its forward and its backward run in different memory formats. The backward is made of
    differentiable ops, so double backward and torch.func's grad transforms work as through F.conv2d."""

    @staticmethod
    def forward(x, weight, bias, geometry, forward_fmt, backward_fmt):
        return _CPUConv(x, weight, bias, *geometry).run(forward_fmt)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, geometry, _, backward_fmt = inputs
        ctx.save_for_backward(x, weight)
        ctx.geometry, ctx.backward_fmt = geometry, backward_fmt

    @staticmethod
    def backward(ctx, dz):
        x, weight = ctx.saved_tensors
        conv = _CPUConv(x, weight, None, *ctx.geometry)
        dx, dweight, dbias = conv.run_backward(ctx.backward_fmt, dz, ctx.needs_input_grad[:3])
        return dx, dweight, dbias, None, None, None


def _epilogue_in_place(z, activation, scale, shift, residual):
    """``act(z) * scale + shift + residual`` written over z, a fresh tensor no caller holds."""
    if activation == "gelu":
        torch.ops.aten.gelu_(z)
    elif activation == "relu":
        z.relu_()
    if scale is not None:
        z.mul_(scale.view(1, -1, 1, 1))
    if shift is not None:
        z.add_(shift.view(1, -1, 1, 1))
    if residual is not None:
        z.add_(residual)
    return z


# --- kernel families ------------------------------------------------------------------------------------------


def _kernels(backend: str) -> SimpleNamespace:
    """fwd/bwd callables of one kernel family, all with the contract in the module docstring."""
    if backend == "triton":
        module = importlib.import_module("vitkern.kernels.depthwise_conv")
        return SimpleNamespace(fwd=module.depthwise_conv2d_fwd, bwd=module.depthwise_conv2d_bwd)
    namespace = {"cuda": torch.ops.vitkern_cuda, "cuda-emulated": torch.ops.vitkern_emu}[backend]
    return SimpleNamespace(fwd=namespace.depthwise_conv2d_fwd, bwd=namespace.depthwise_conv2d_bwd)


def _empty_like_format(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))


@torch.library.custom_op("vitkern::depthwise_conv2d", mutates_args=())
def _depthwise_conv2d_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    residual: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    activation: int,
    save_z: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(
        _kernels(backend).fwd(
            x, weight, bias, scale, shift, residual, stride, padding, dilation, activation, save_z
        )
    )


@_depthwise_conv2d_op.register_fake
def _(x, weight, bias, scale, shift, residual, stride, padding, dilation, activation, save_z, backend):
    out_h = output_size(x.shape[2], weight.shape[2], stride[0], padding[0], padding[1], dilation[0])
    out_w = output_size(x.shape[3], weight.shape[3], stride[1], padding[2], padding[3], dilation[1])
    shape = (x.shape[0], x.shape[1], out_h, out_w)
    y = _empty_like_format(x, shape)
    z = _empty_like_format(x, shape) if save_z else x.new_empty(0)
    return y, z


@torch.library.custom_op("vitkern::depthwise_conv2d_backward", mutates_args=())
def _depthwise_conv2d_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor,
    scale: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    activation: int,
    output_mask: list[bool],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(
        _kernels(backend).bwd(dy, x, weight, z, scale, stride, padding, dilation, activation, output_mask)
    )


@_depthwise_conv2d_backward_op.register_fake
def _(dy, x, weight, z, scale, stride, padding, dilation, activation, output_mask, backend):
    channels = x.shape[1]
    shapes = (tuple(x.shape), tuple(weight.shape), (channels,), (channels,), (channels,))
    outs = []
    for needed, shape, like in zip(output_mask, shapes, (x, weight, weight, weight, weight)):
        if not needed:
            outs.append(like.new_empty(0))
        elif like is x:
            outs.append(_empty_like_format(x, shape))
        else:
            outs.append(like.new_empty(shape))
    return tuple(outs)


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, residual, stride, padding, dilation, activation, save_z, backend = inputs
    _, z = output
    ctx.save_for_backward(x, weight, z, scale)
    ctx.conv_args = (stride, padding, dilation, activation)
    ctx.has = (bias is not None, scale is not None, shift is not None, residual is not None)
    ctx.backend = backend


def _backward(ctx, dy, _dz):
    x, weight, z, scale = ctx.saved_tensors
    has_bias, has_scale, has_shift, has_residual = ctx.has
    needs = ctx.needs_input_grad
    output_mask = [needs[0], needs[1], has_bias and needs[2], has_scale and needs[3], has_shift and needs[4]]
    dy = dy.contiguous(memory_format=memory_format(x))
    if any(output_mask):
        dx, dweight, dbias, dscale, dshift = torch.ops.vitkern.depthwise_conv2d_backward(
            dy, x, weight, z, scale, *ctx.conv_args, output_mask, ctx.backend
        )
    else:
        dx = dweight = dbias = dscale = dshift = None
    grads = [dx, dweight, dbias, dscale, dshift]
    grads = [g if needed else None for g, needed in zip(grads, output_mask)]
    dresidual = dy if has_residual and needs[5] else None
    return (*grads, dresidual, None, None, None, None, None, None)


_depthwise_conv2d_op.register_autograd(_backward, setup_context=_setup_context)
