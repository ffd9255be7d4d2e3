"""Public fused ops. Each checks its arguments, resolves the backend (:func:`vitkern.backend`) and runs."""

from vitkern.ops.attention import biased_attention, levit_attention, rel_pos_attention
from vitkern.ops.depthwise_conv import depthwise_conv2d

__all__ = ["biased_attention", "depthwise_conv2d", "levit_attention", "rel_pos_attention"]
