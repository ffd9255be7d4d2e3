"""``vitkern.ops.depthwise_conv2d``: depthwise convolution with a fused per-channel epilogue.

``y = act(conv(x, weight) + bias) * scale + shift + residual``. The public function checks its arguments, asks
the op's registry (:mod:`vitkern.dispatch`) which implementation runs the call, and runs it:

* ``eager``: :func:`vitkern.reference.depthwise_conv2d`;
* ``cpu``: :mod:`vitkern.cpu.depthwise_conv`;
* ``triton``, ``cuda``, ``cuda-emulated``: the custom op of :mod:`vitkern.custom_ops.depthwise_conv`, whose forward
  and backward call one kernel family: Triton (:mod:`vitkern.kernels.depthwise_conv`) or the CUDA C++ kernels of
  ``csrc/depthwise_conv.cu`` (``torch.ops.vitkern_cuda`` / ``torch.ops.vitkern_emu``).

The kernel contract is in :mod:`vitkern.kernels.contract`.
"""

from __future__ import annotations

import torch

from vitkern import cpu, custom_ops, reference
from vitkern.dispatch import Call, Implementation, Registry, interpreter_has_no_bf16
from vitkern.kernels.contract import MAX_KERNEL, output_size
from vitkern.ops._checks import check_like, check_shape, check_tensor, pair
from vitkern.reference.depthwise_conv import ACTIVATIONS, resolve_padding


REGISTRY = Registry(
    "depthwise_conv2d",
    (
        Implementation("eager", ("cpu", "cuda")),
        Implementation("cpu", ("cpu",)),
        Implementation("cuda", ("cuda",)),
        Implementation("cuda-emulated", ("cpu",)),
        Implementation("triton", ("cpu", "cuda"), limits=(interpreter_has_no_bf16,)),
    ),
    auto_order=("cpu", "cuda", "triton", "eager"),
)


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
    impl = REGISTRY.select(Call(x.device, x.dtype)).name
    if impl == "eager":
        return reference.depthwise_conv2d(
            x, weight, bias, stride, padding, dilation, activation, scale, shift, residual
        )
    if impl == "cpu":
        return cpu.depthwise_conv.depthwise_conv2d(
            x, weight, bias, stride, pads, dilation, out_size, activation, scale, shift, residual
        )
    return custom_ops.depthwise_conv.depthwise_conv2d(
        x, weight, bias, stride, pads, dilation, activation, scale, shift, residual, impl
    )
