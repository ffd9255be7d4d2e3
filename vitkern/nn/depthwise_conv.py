"""``vitkern.nn.DepthwiseConv2d``: a drop-in ``nn.Conv2d`` (same parameters and state_dict) on the fused op."""

from __future__ import annotations

import torch
import torch.nn as nn

from vitkern.ops.depthwise_conv import depthwise_conv2d


class DepthwiseConv2d(nn.Conv2d):
    """Depthwise ``nn.Conv2d`` (``groups == in_channels == out_channels``) running
    :func:`vitkern.ops.depthwise_conv2d` on the current backend.

    Parameters, buffers and state_dict keys are those of ``nn.Conv2d``; ``padding_mode`` must be "zeros".
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = "same",
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            channels,
            channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups=channels,
            bias=bias,
            device=device,
            dtype=dtype,
        )

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d) -> DepthwiseConv2d:
        """A DepthwiseConv2d with ``conv``'s configuration and a copy of its parameters."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv: expected an nn.Conv2d, got {type(conv).__name__}")
        if not (conv.groups == conv.in_channels == conv.out_channels):
            raise ValueError(
                f"conv: expected a depthwise convolution (groups == in_channels == out_channels), got groups="
                f"{conv.groups}, in_channels={conv.in_channels}, out_channels={conv.out_channels}"
            )
        if conv.padding_mode != "zeros":
            raise ValueError(f"conv: expected padding_mode 'zeros', got {conv.padding_mode!r}")
        module = cls(
            conv.in_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        module.load_state_dict(conv.state_dict())
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
