"""The kernel contract: what every kernel family (Triton here, CUDA C++ in ``csrc/``) takes and returns, and the
constants and shape helpers that the kernels and the ops above them share.

This module is the bottom of the stack: it imports torch and nothing of vitkern, so the kernels depend on it and
never on :mod:`vitkern.ops`. The CUDA C++ sources spell the same codes in ``csrc/`` (their registrations in
``csrc/ops.cpp`` carry these signatures).

Depthwise convolution::

    depthwise_conv2d_fwd(x, weight, bias, scale, shift, residual, stride, padding, dilation, activation, save_z)
        -> (y, z)
    depthwise_conv2d_bwd(dy, x, weight, z, scale, stride, padding, dilation, activation, output_mask)
        -> (dx, dweight, dbias, dscale, dshift)

x, residual, y, z, dy, dx: (N, C, H, W), all contiguous in x's memory format (NCHW or channels_last); weight
(C, 1, kh, kw) contiguous; bias, scale, shift (C,). stride, dilation: [sh, sw]; padding: [top, bottom, left, right];
activation: an ``ACTIVATION_CODES`` value. z is the pre-activation ``conv + bias`` in x's dtype, returned only when
``save_z`` (else an empty tensor). output_mask says which of the five gradients to compute; the others come back
empty. Accumulation is fp32; the weight gradient is deterministic.

Attention::

    attention_fwd(q, k, v, bias, mask, bias_mode, geometry, scale) -> (out, lse)
    attention_bwd(dout, q, k, v, out, lse, bias, mask, bias_mode, geometry, scale, bias_grad) -> (dq, dk, dv, dbias)

q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv), contiguous. bias_mode ``BIAS_NONE``; ``BIAS_REL_POS``: a table
((2Wh-1)(2Ww-1), H), geometry [Wh, Ww]; ``BIAS_LEVIT``: LeViT biases (H, R*R), geometry [R, stride]; ``BIAS_DENSE``:
a 4-D bias broadcastable to (B, H, Nq, Nk). Tables are read through their strides. mask: None or a
(num_windows, Nq, Nk) contiguous additive mask in q's dtype, no gradient, added to the scores of batch entry b as
mask[b % num_windows] (Swin's shifted windows), with any bias_mode. out is (B, H, Nq, Dv) in q's
dtype, lse (B, H, Nq) fp32; dbias has the bias's own shape (an empty tensor when ``bias_grad`` is False). A query
row whose every score is -inf gives zeros.
"""

from __future__ import annotations

import torch

# Depthwise convolution: the epilogue's activation as the kernels' compile-time switch.
ACTIVATION_CODES = {None: 0, "gelu": 1, "relu": 2}
# The largest kernel side any kernel family takes.
MAX_KERNEL = 63

# Attention: how the kernels read the bias.
BIAS_NONE, BIAS_REL_POS, BIAS_LEVIT, BIAS_DENSE = 0, 1, 2, 3
BIAS_MODES = (BIAS_NONE, BIAS_REL_POS, BIAS_LEVIT, BIAS_DENSE)
# The largest q/k and v head dim the attention kernels take.
MAX_HEAD_DIM = 128

# The four signatures above in torch.library schema syntax, (arguments, returns): what the custom ops of
# vitkern.custom_ops declare, with the kernel family (``str backend``) after them (:func:`with_backend`). csrc/ops.cpp
# registers the CUDA C++ families' ops with the same arguments, its int lists fixed-size.
DEPTHWISE_CONV2D_FWD_SCHEMA = (
    "Tensor x, Tensor weight, Tensor? bias, Tensor? scale, Tensor? shift, Tensor? residual, SymInt[] stride, "
    "SymInt[] padding, SymInt[] dilation, SymInt activation, bool save_z",
    "(Tensor, Tensor)",
)
DEPTHWISE_CONV2D_BWD_SCHEMA = (
    "Tensor dy, Tensor x, Tensor weight, Tensor z, Tensor? scale, SymInt[] stride, SymInt[] padding, "
    "SymInt[] dilation, SymInt activation, bool[] output_mask",
    "(Tensor, Tensor, Tensor, Tensor, Tensor)",
)
ATTENTION_FWD_SCHEMA = (
    "Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? mask, SymInt bias_mode, SymInt[] geometry, float scale",
    "(Tensor, Tensor)",
)
ATTENTION_BWD_SCHEMA = (
    "Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? bias, Tensor? mask, "
    "SymInt bias_mode, SymInt[] geometry, float scale, bool bias_grad",
    "(Tensor, Tensor, Tensor, Tensor)",
)


def with_backend(schema: tuple[str, str]) -> str:
    """The schema of an op that takes a contract signature's arguments and then the kernel family to run them on."""
    arguments, returns = schema
    return f"({arguments}, str backend) -> {returns}"


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when x is laid out that way (and not also plain contiguous), else contiguous_format."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def output_size(size: int, kernel: int, stride: int, pad_lo: int, pad_hi: int, dilation: int) -> int:
    """Output length of a convolution along one axis."""
    return (size + pad_lo + pad_hi - dilation * (kernel - 1) - 1) // stride + 1


def levit_query_side(resolution: int, stride: int) -> int:
    """The side of LeViT's query grid: the key grid's side ``resolution`` sampled every ``stride``."""
    return (resolution - 1) // stride + 1
