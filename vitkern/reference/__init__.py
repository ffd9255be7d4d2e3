"""Plain-PyTorch implementations that every kernel is checked against (the ``eager`` backend)."""

from vitkern.reference.attention import (
    biased_attention,
    levit_attention,
    levit_bias,
    levit_index,
    rel_pos_attention,
    rel_pos_bias,
    rel_pos_index,
)
from vitkern.reference.depthwise_conv import depthwise_conv2d, epilogue as depthwise_conv2d_epilogue

__all__ = [
    "biased_attention",
    "depthwise_conv2d",
    "depthwise_conv2d_epilogue",
    "levit_attention",
    "levit_bias",
    "levit_index",
    "rel_pos_attention",
    "rel_pos_bias",
    "rel_pos_index",
]
