"""The CPU path (``auto`` on CPU tensors): each op in plain PyTorch ops, the fastest equivalent form measured per
problem (:mod:`vitkern._tuning`). Called by :mod:`vitkern.ops` on arguments it has checked."""

from vitkern.cpu import attention, depthwise_conv

__all__ = ["attention", "depthwise_conv"]
