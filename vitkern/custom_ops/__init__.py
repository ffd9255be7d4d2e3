"""The ``torch.library`` custom ops through which every kernel family runs: fake implementations for
torch.compile, registered autograd, and the binding of each family to the kernel contract
(:mod:`vitkern.kernels.contract`). Called by :mod:`vitkern.ops` on arguments it has checked."""

from vitkern.custom_ops import attention, depthwise_conv

__all__ = ["attention", "depthwise_conv"]
