"""Attention with learned position biases: ``softmax(scale * q @ k^T + bias) @ v``.

Three public ops share one kernel whose bias mode is a compile-time switch:

* :func:`rel_pos_attention`: a relative-position table (CoAtNet, Swin), gathered inside the kernel;
* :func:`levit_attention`: LeViT's per-offset biases, with the stride-2 "shrink" form;
* :func:`biased_attention`: a dense additive bias broadcastable to (B, heads, Nq, Nk).

The public functions check their arguments, ask the attention registry (:mod:`vitkern.dispatch`) which
implementation runs the call, and run it:

* ``eager``: :mod:`vitkern.reference.attention`;
* ``cpu``: :mod:`vitkern.cpu.attention`;
* ``triton``, ``cuda``, ``cuda-emulated``: the custom op of :mod:`vitkern.custom_ops.attention`, whose forward and
  backward call the Triton kernels in :mod:`vitkern.kernels.attention` or the CUDA C++ kernels of
  ``csrc/attention_kernels.cuh`` (``vitkern._C`` on CUDA tensors, the emulation build ``vitkern._emulation`` on CPU
  tensors).

``auto`` on CUDA tensors chooses per shape (:func:`_auto_order`): the CUDA C++ kernel for fp32 inputs whose keys
fit its resident key tile (Nk <= ``CUDA_RESIDENT_KEYS``), where both families compute exact fp32 products and the
CUDA C++ kernel reads K and V once per (batch, head); Triton otherwise (it streams long sequences; fp16 and bf16 run
on tensor cores in both families). The rule is set from the kernels' designs, not from a measurement on a GPU; it is
to be revisited when a GPU measures both (``benchmarks/``).

The kernel contract is in :mod:`vitkern.kernels.contract`.
"""

from __future__ import annotations

import torch

from vitkern import cpu, custom_ops, reference
from vitkern.dispatch import Call, Implementation, Registry, interpreter_has_no_bf16
from vitkern.kernels.contract import (
    BIAS_DENSE,
    BIAS_LEVIT,
    BIAS_NONE,
    BIAS_REL_POS,
    MAX_HEAD_DIM,
    levit_query_side,
)
from vitkern.ops._checks import check_like, check_scale, check_tensor, pair


# The CUDA C++ kernel keeps K and V of one (batch, head) in shared memory up to this many keys (kMaxResidentKeys
# in csrc/attention_kernels.cuh); longer sequences stream over key tiles.
CUDA_RESIDENT_KEYS = 256


def _head_dims(call: Call) -> str | None:
    if max(call.head_dim, call.value_dim) > MAX_HEAD_DIM:
        return f"takes head dims up to {MAX_HEAD_DIM}, got {call.head_dim} (q, k) and {call.value_dim} (v)"
    return None


def _auto_order(call: Call) -> tuple[str, ...]:
    """``auto``'s priority list: the CPU path on CPU tensors; on CUDA tensors the CUDA C++ kernel first for fp32
    with at most CUDA_RESIDENT_KEYS keys, Triton first otherwise (module docstring)."""
    if call.dtype == torch.float32 and call.keys <= CUDA_RESIDENT_KEYS:
        return ("cpu", "cuda", "triton", "eager")
    return ("cpu", "triton", "cuda", "eager")


REGISTRY = Registry(
    "attention",
    (
        Implementation("eager", ("cpu", "cuda")),
        Implementation("cpu", ("cpu",)),
        Implementation("triton", ("cpu", "cuda"), limits=(interpreter_has_no_bf16, _head_dims)),
        Implementation("cuda", ("cuda",), limits=(_head_dims,)),
        Implementation("cuda-emulated", ("cpu",), limits=(_head_dims,)),
    ),
    auto_order=_auto_order,
)


def implementation(op: str, q: torch.Tensor, v: torch.Tensor, bias_mode: int, has_mask: bool = False) -> str:
    """The name of the implementation that the attention op ``op`` runs for query and value tensors like ``q``
    and ``v`` (and a shifted-window mask when ``has_mask``) under the backend in force: what a module needs to know
    to decide what to cache."""
    call = Call(
        q.device,
        q.dtype,
        {
            "op": op,
            "bias_mode": bias_mode,
            "head_dim": q.shape[-1],
            "value_dim": v.shape[-1],
            "keys": v.shape[-2],
            "has_mask": has_mask,
        },
    )
    return REGISTRY.select(call).name


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_tensor("v", v, ndim=4)
    check_like("k", k, "q", q)
    check_like("v", v, "q", q)
    if k.shape[:2] != q.shape[:2]:
        raise ValueError(f"k: expected (batch, heads) = {tuple(q.shape[:2])} as q, got {tuple(k.shape[:2])}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v: expected (batch, heads, tokens) = {tuple(k.shape[:3])} as k, got {tuple(v.shape[:3])}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k: expected head_dim {q.shape[3]} as q, got {k.shape[3]}")
    if q.shape[3] < 1:
        raise ValueError(f"q: expected head_dim >= 1, got shape {tuple(q.shape)}")
    if v.shape[3] < 1:
        raise ValueError(f"v: expected value_dim >= 1, got shape {tuple(v.shape)}")


def _check_bias_table(name: str, t: torch.Tensor, q: torch.Tensor, expected: tuple[int, int]) -> None:
    check_tensor(name, t, ndim=2)
    check_like(name, t, "q", q)
    if tuple(t.shape) != expected:
        raise ValueError(f"{name}: expected shape {expected}, got {tuple(t.shape)}")


def rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: torch.Tensor,
    window: int | tuple[int, int],
    scale: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention with a relative-position bias table (CoAtNet, Swin), gathered inside the kernel.

    Args:
        q, k: (B, heads, N, D); v: (B, heads, N, Dv); N = Wh * Ww tokens in row-major order.
        table: ((2Wh-1)(2Ww-1), heads); bias[h, i, j] = table[(yi-yj+Wh-1)*(2Ww-1) + (xi-xj+Ww-1), h]. Read through
            its strides, so a transposed view works without a copy.
        window: (Wh, Ww) or an int for a square window.
        scale: defaults to D ** -0.5.
        mask: None or (num_windows, N, N) in q's dtype, B a multiple of num_windows: added to the scores of batch
            entry b as mask[b % num_windows] (Swin's shifted windows, 0 / large negative or -inf; timm
            ``swin_transformer.WindowAttention``). No gradient; read inside the kernel, never expanded to
            (B, heads, N, N). A query row whose every score is -inf gives zeros.

    Returns:
        (B, heads, N, Dv).
    """
    _check_qkv(q, k, v)
    wh, ww = pair("window", window, 1)
    tokens = wh * ww
    if q.shape[2] != tokens:
        raise ValueError(f"q: expected Wh*Ww = {tokens} tokens for window {(wh, ww)}, got {q.shape[2]}")
    if k.shape[2] != tokens:
        raise ValueError(f"k: expected Wh*Ww = {tokens} tokens for window {(wh, ww)}, got {k.shape[2]}")
    _check_bias_table("table", table, q, ((2 * wh - 1) * (2 * ww - 1), q.shape[1]))
    scale = check_scale(scale)
    if mask is not None:
        _check_window_mask(mask, q, tokens)
    impl = implementation("rel_pos_attention", q, v, BIAS_REL_POS, has_mask=mask is not None)
    if impl == "eager":
        return reference.rel_pos_attention(q, k, v, table, (wh, ww), scale, mask)
    if impl == "cpu":
        return cpu.attention.rel_pos_attention(q, k, v, table, (wh, ww), scale, mask)
    mask = None if mask is None else mask.contiguous()
    return custom_ops.attention.attention(q, k, v, table, BIAS_REL_POS, [wh, ww], scale, impl, mask)


def _check_window_mask(mask: torch.Tensor, q: torch.Tensor, tokens: int) -> None:
    check_tensor("mask", mask, ndim=3)
    check_like("mask", mask, "q", q)
    if tuple(mask.shape[1:]) != (tokens, tokens):
        raise ValueError(f"mask: expected shape (num_windows, {tokens}, {tokens}), got {tuple(mask.shape)}")
    if mask.shape[0] < 1 or q.shape[0] % mask.shape[0]:
        raise ValueError(
            f"mask: expected num_windows dividing the batch {q.shape[0]} of q, got {mask.shape[0]} windows"
        )
    if mask.requires_grad:
        raise ValueError(
            "mask: expected a tensor that does not require grad (the mask takes no gradient), got one that does"
        )


def levit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    biases: torch.Tensor,
    resolution: int,
    stride: int = 1,
    scale: float | None = None,
) -> torch.Tensor:
    """LeViT attention with its learned per-offset biases, including the strided "shrink" attention.

    Args:
        q: (B, heads, ceil(R/stride)**2, D) queries on the stride grid; k: (B, heads, R*R, D); v: (B, heads, R*R, Dv).
        biases: (heads, R*R) as timm's ``attention_biases``; bias[h, i, j] = biases[h, |s*yi - yj|*R + |s*xi - xj|].
        resolution: R, the key grid's side. stride: s >= 1.
        scale: defaults to D ** -0.5.

    Returns:
        (B, heads, ceil(R/stride)**2, Dv).
    """
    _check_qkv(q, k, v)
    if isinstance(resolution, bool) or not isinstance(resolution, int):
        raise TypeError(f"resolution: expected an int, got {type(resolution).__name__}")
    if isinstance(stride, bool) or not isinstance(stride, int):
        raise TypeError(f"stride: expected an int, got {type(stride).__name__}")
    if resolution < 1:
        raise ValueError(f"resolution: expected >= 1, got {resolution}")
    if stride < 1:
        raise ValueError(f"stride: expected >= 1, got {stride}")
    keys = resolution * resolution
    queries = levit_query_side(resolution, stride) ** 2
    if k.shape[2] != keys:
        raise ValueError(f"k: expected R*R = {keys} tokens for resolution {resolution}, got {k.shape[2]}")
    if q.shape[2] != queries:
        raise ValueError(
            f"q: expected ceil(R/stride)**2 = {queries} tokens for resolution {resolution} and stride {stride}, "
            f"got {q.shape[2]}"
        )
    _check_bias_table("biases", biases, q, (q.shape[1], keys))
    scale = check_scale(scale)
    impl = implementation("levit_attention", q, v, BIAS_LEVIT)
    if impl == "eager":
        return reference.levit_attention(q, k, v, biases, resolution, stride, scale)
    if impl == "cpu":
        return cpu.attention.levit_attention(q, k, v, biases, resolution, stride, scale)
    return custom_ops.attention.attention(q, k, v, biases, BIAS_LEVIT, [resolution, stride], scale, impl)


def biased_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention with a dense additive bias (Swin's shifted-window mask, anything else).

    Args:
        q: (B, heads, Nq, D); k: (B, heads, Nk, D); v: (B, heads, Nk, Dv).
        bias: broadcastable to (B, heads, Nq, Nk), may hold -inf; its gradient comes back in its own shape.
            A query row whose every score is -inf gives zeros.
        scale: defaults to D ** -0.5.

    Returns:
        (B, heads, Nq, Dv).
    """
    _check_qkv(q, k, v)
    if bias is not None:
        check_tensor("bias", bias)
        check_like("bias", bias, "q", q)
        if bias.dim() == 0:
            raise ValueError(
                "bias: expected 1 to 4 dims broadcastable to (B, heads, Nq, Nk), got a 0-D tensor "
                "(a constant bias does not change the softmax: pass None)"
            )
        full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        if bias.dim() > 4 or any(size not in (1, want) for size, want in zip(reversed(bias.shape), reversed(full))):
            raise ValueError(f"bias: expected a shape broadcastable to {full}, got {tuple(bias.shape)}")
    scale = check_scale(scale)
    bias_mode = BIAS_NONE if bias is None else BIAS_DENSE
    impl = implementation("biased_attention", q, v, bias_mode)
    if impl == "eager":
        return reference.biased_attention(q, k, v, bias, scale)
    if impl == "cpu":
        return cpu.attention.biased_attention(q, k, v, bias, scale)
    bias4 = None if bias is None else bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    return custom_ops.attention.attention(q, k, v, bias4, bias_mode, [], scale, impl)
