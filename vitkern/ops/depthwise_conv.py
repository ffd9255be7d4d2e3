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

from vitkern import reference
from vitkern._backend import resolve
from vitkern.ops._checks import check_like, check_shape, check_tensor, pair
from vitkern.reference.depthwise_conv import ACTIVATIONS, resolve_padding

ACTIVATION_CODES = {None: 0, "gelu": 1, "relu": 2}
MAX_KERNEL = 63
# The CPU path runs an NCHW input through F.conv2d in channels_last where that is faster. Measured with torch 2.14
# on this machine's CPU (single-thread CPU time, batch 2): the NCHW forward falls off a cliff from kernel width 15 on
# (2x256x32x32: 13x13 3.3 ms NCHW against 11 ms converted; 15x15 59 ms against 10 ms; 51x5 stays fast, 5x21 does
# not), and the NCHW backward is about twice as slow as channels_last for kernels from 5x5 on maps of 16x16 and
# larger (9x9 on 2x256x32x32: 46 ms against 24 ms forward+backward) but faster on small maps (7x7 on 2x768x7x7:
# 5 ms against 23 ms).
CPU_NCHW_SLOW_KERNEL_WIDTH = 15
CPU_CHANNELS_LAST_BACKWARD_MIN_TAPS = 25
CPU_CHANNELS_LAST_BACKWARD_MIN_PIXELS = 256


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
    channels = x.shape[1]
    if weight.shape[0] != channels or weight.shape[1] != 1:
        raise ValueError(
            f"weight: expected shape ({channels}, 1, kh, kw) for a depthwise convolution of {channels} channels, "
            f"got {tuple(weight.shape)}"
        )
    kernel = (weight.shape[2], weight.shape[3])
    if not (1 <= min(kernel) and max(kernel) <= MAX_KERNEL):
        raise ValueError(f"weight: expected kernel sizes from 1 to {MAX_KERNEL}, got {kernel[0]}x{kernel[1]}")
    stride = pair("stride", stride, 1)
    dilation = pair("dilation", dilation, 1)
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding: expected 'same', 'valid', an int or a pair of ints, got {padding!r}")
    else:
        pair("padding", padding, 0)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    pads = resolve_padding(padding, kernel, dilation)
    out_h = output_size(x.shape[2], kernel[0], stride[0], pads[0], pads[1], dilation[0])
    out_w = output_size(x.shape[3], kernel[1], stride[1], pads[2], pads[3], dilation[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"x: input of spatial size {tuple(x.shape[2:])} is smaller than the dilated kernel "
            f"{kernel[0]}x{kernel[1]} (dilation {dilation}) with padding {pads}: output would be {out_h}x{out_w}"
        )
    for name, vec in (("bias", bias), ("scale", scale), ("shift", shift)):
        if vec is not None:
            check_tensor(name, vec, ndim=1)
            check_like(name, vec, "x", x)
            check_shape(name, vec, (channels,))
    if residual is not None:
        check_tensor("residual", residual, ndim=4)
        check_like("residual", residual, "x", x)
        check_shape("residual", residual, (x.shape[0], channels, out_h, out_w))
    return stride, list(pads), dilation


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
    stride, pads, dilation = _check_args(
        x, weight, bias, stride, padding, dilation, activation, scale, shift, residual
    )
    impl = resolve("depthwise_conv2d", x.device, auto_gpu="cuda")
    if impl == "eager":
        return reference.depthwise_conv2d(
            x, weight, bias, stride, padding, dilation, activation, scale, shift, residual
        )
    if impl == "cpu":
        return _cpu_forward(x, weight, bias, stride, pads, dilation, activation, scale, shift, residual)
    fmt = memory_format(x)
    tensors = (x, weight, bias, scale, shift, residual)
    save_z = (activation is not None or scale is not None) and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors
    )
    y, _ = torch.ops.vitkern.depthwise_conv2d(
        x.contiguous(memory_format=fmt),
        weight.contiguous(),
        *(None if vec is None else vec.contiguous() for vec in (bias, scale, shift)),
        None if residual is None else residual.contiguous(memory_format=fmt),
        list(stride),
        pads,
        list(dilation),
        ACTIVATION_CODES[activation],
        save_z,
        impl,
    )
    return y


def _cpu_prefers_channels_last(x: torch.Tensor, kernel: tuple[int, int], needs_grad: bool) -> bool:
    """Whether F.conv2d on CPU runs an NCHW input faster converted to channels_last (the rule measured above)."""
    if kernel[1] >= CPU_NCHW_SLOW_KERNEL_WIDTH:
        return True
    return (
        needs_grad
        and kernel[0] * kernel[1] >= CPU_CHANNELS_LAST_BACKWARD_MIN_TAPS
        and x.shape[2] * x.shape[3] >= CPU_CHANNELS_LAST_BACKWARD_MIN_PIXELS
    )


def _cpu_forward(x, weight, bias, stride, pads, dilation, activation, scale, shift, residual):
    """The ``auto`` path on CPU tensors: F.conv2d in the faster layout, then the plain epilogue on the fresh output
    (never on an input)."""
    fmt = memory_format(x)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, scale, shift, residual)
    )
    conv_in = x
    if fmt == torch.contiguous_format and _cpu_prefers_channels_last(x, tuple(weight.shape[2:]), needs_grad):
        conv_in = x.contiguous(memory_format=torch.channels_last)
    top, bottom, left, right = pads
    if top == bottom and left == right:
        z = F.conv2d(conv_in, weight, bias, stride, (top, left), dilation, x.shape[1])
    else:
        z = F.conv2d(F.pad(conv_in, (left, right, top, bottom)), weight, bias, stride, 0, dilation, x.shape[1])
    y = reference.depthwise_conv2d_epilogue(z, activation, scale, shift, residual)
    return y.contiguous(memory_format=fmt)


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
