"""Public fused ops. Each checks its arguments, resolves the backend (:func:`vitkern.backend`) and runs."""

from vitkern.ops.depthwise_conv import depthwise_conv2d

__all__ = ["depthwise_conv2d"]
