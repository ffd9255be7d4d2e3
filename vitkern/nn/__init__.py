"""Drop-in modules running on vitkern ops."""

from vitkern.nn.attention import LeViTAttention, RelPosAttention
from vitkern.nn.depthwise_conv import DepthwiseConv2d

__all__ = ["DepthwiseConv2d", "LeViTAttention", "RelPosAttention"]
