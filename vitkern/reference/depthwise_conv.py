"""Plain-PyTorch oracle for :func:`vitkern.ops.depthwise_conv2d`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = (None, "gelu", "relu")


def same_padding(kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) padding of ``padding="same"``: ``dilation * (k - 1)`` in total per dimension,
    the odd element at the bottom/right, as ``F.conv2d(padding="same")`` does."""
    total_h = dilation[0] * (kernel[0] - 1)
    total_w = dilation[1] * (kernel[1] - 1)
    return total_h // 2, total_h - total_h // 2, total_w // 2, total_w - total_w // 2


def resolve_padding(
    padding: str | int | tuple[int, int], kernel: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Normalise every accepted padding form to (top, bottom, left, right)."""
    if padding == "same":
        return same_padding(kernel, dilation)
    if padding == "valid":
        return 0, 0, 0, 0
    if isinstance(padding, int):
        return padding, padding, padding, padding
    ph, pw = padding
    return ph, ph, pw, pw


def activation_fn(activation: str | None, z: torch.Tensor) -> torch.Tensor:
    if activation is None:
        return z
    if activation == "gelu":
        return F.gelu(z)
    if activation == "relu":
        return F.relu(z)
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


def epilogue(
    z: torch.Tensor,
    activation: str | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """``act(z) * scale + shift + residual`` with per-channel scale and shift."""
    y = activation_fn(activation, z)
    if scale is not None:
        y = y * scale.view(1, -1, 1, 1)
    if shift is not None:
        y = y + shift.view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual
    return y


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
    """``act(conv(x, weight) + bias) * scale + shift + residual``, conv the depthwise ``F.conv2d(groups=C)``.

    x: (N, C, H, W); weight: (C, 1, kh, kw); bias, scale, shift: (C,); residual: the output's shape.
    """
    stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
    dilation = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    top, bottom, left, right = resolve_padding(padding, tuple(weight.shape[-2:]), dilation)
    x_padded = F.pad(x, (left, right, top, bottom))
    z = F.conv2d(x_padded, weight, bias, stride=stride, dilation=dilation, groups=x.shape[1])
    return epilogue(z, activation, scale, shift, residual)
