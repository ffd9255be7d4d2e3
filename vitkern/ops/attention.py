"""Attention with learned position biases: ``softmax(scale * q @ k^T + bias) @ v``.

Three public ops share one kernel whose bias mode is a compile-time switch:

* :func:`rel_pos_attention`: a relative-position table (CoAtNet, Swin), gathered inside the kernel;
* :func:`levit_attention`: LeViT's per-offset biases, with the stride-2 "shrink" form;
* :func:`biased_attention`: a dense additive bias broadcastable to (B, heads, Nq, Nk).

The public functions check their arguments, resolve the backend and either run plain PyTorch (``eager``: the
reference; ``cpu``: the tuned CPU path) or the custom op ``vitkern::attention``, whose forward and backward call the
Triton kernels in :mod:`vitkern.kernels.attention`.

Kernel contract::

    attention_fwd(q, k, v, bias, bias_mode, geometry, scale) -> (out, lse)
    attention_bwd(dout, q, k, v, out, lse, bias, bias_mode, geometry, scale, bias_grad) -> (dq, dk, dv, dbias)

bias_mode 0: none; 1: table ((2Wh-1)(2Ww-1), heads), geometry [Wh, Ww]; 2: LeViT biases (heads, R*R), geometry
[R, stride]; 3: a dense 4-D bias broadcastable to (B, heads, Nq, Nk). out is (B, heads, Nq, Dv) in q's dtype, lse
(B, heads, Nq) fp32; dbias has the bias's own shape (an empty tensor when ``bias_grad`` is False).
"""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F

from vitkern import _tuning, reference
from vitkern._backend import resolve
from vitkern.ops._checks import check_like, check_scale, check_tensor, needs_grad, pair

BIAS_NONE, BIAS_REL_POS, BIAS_LEVIT, BIAS_DENSE = 0, 1, 2, 3
# The CPU path keeps the (Nq, Nk) gather index of each window or resolution it has seen, up to this many entries
# per index (8 MiB of int64): a 4096-token window's 16.8M-entry index is rebuilt instead.
CPU_MAX_CACHED_INDEX = 1 << 20


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
) -> torch.Tensor:
    """Attention with a relative-position bias table (CoAtNet, Swin), gathered inside the kernel.

    Args:
        q, k: (B, heads, N, D); v: (B, heads, N, Dv); N = Wh * Ww tokens in row-major order.
        table: ((2Wh-1)(2Ww-1), heads); bias[h, i, j] = table[(yi-yj+Wh-1)*(2Ww-1) + (xi-xj+Ww-1), h]. Read through
            its strides, so a transposed view works without a copy.
        window: (Wh, Ww) or an int for a square window.
        scale: defaults to D ** -0.5.

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
    impl = resolve("rel_pos_attention", q.device, auto_gpu="triton")
    if impl == "eager":
        return reference.rel_pos_attention(q, k, v, table, (wh, ww), scale)
    if impl == "cpu":
        bias = table.t().index_select(1, _rel_pos_flat_index((wh, ww), q.device)).view(-1, tokens, tokens)
        return _cpu_attention(q, k, v, bias, scale)
    return _fused(q, k, v, table, BIAS_REL_POS, [wh, ww], scale, impl, "rel_pos_attention")


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
    queries = ((resolution - 1) // stride + 1) ** 2
    if k.shape[2] != keys:
        raise ValueError(f"k: expected R*R = {keys} tokens for resolution {resolution}, got {k.shape[2]}")
    if q.shape[2] != queries:
        raise ValueError(
            f"q: expected ceil(R/stride)**2 = {queries} tokens for resolution {resolution} and stride {stride}, "
            f"got {q.shape[2]}"
        )
    _check_bias_table("biases", biases, q, (q.shape[1], keys))
    scale = check_scale(scale)
    impl = resolve("levit_attention", q.device, auto_gpu="triton")
    if impl == "eager":
        return reference.levit_attention(q, k, v, biases, resolution, stride, scale)
    if impl == "cpu":
        bias = biases.index_select(1, _levit_flat_index(resolution, stride, q.device)).view(-1, queries, keys)
        return _cpu_attention(q, k, v, bias, scale)
    return _fused(q, k, v, biases, BIAS_LEVIT, [resolution, stride], scale, impl, "levit_attention")


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
        full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        if bias.dim() > 4 or any(
            size not in (1, want) for size, want in zip(reversed(bias.shape), reversed(full))
        ):
            raise ValueError(f"bias: expected a shape broadcastable to {full}, got {tuple(bias.shape)}")
    scale = check_scale(scale)
    impl = resolve("biased_attention", q.device, auto_gpu="triton")
    bias4 = None if bias is None else bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    if impl == "cpu" and (bias is None or not _may_mask_rows(bias)):
        return _cpu_attention(q, k, v, bias4, scale)
    if impl in ("eager", "cpu"):
        return reference.biased_attention(q, k, v, bias, scale)
    if bias is None:
        return _fused(q, k, v, None, BIAS_NONE, [], scale, impl, "biased_attention")
    return _fused(q, k, v, bias4, BIAS_DENSE, [], scale, impl, "biased_attention")


def _cpu_attention(q, k, v, bias, scale):
    """The ``auto`` path on CPU tensors, for a bias that is finite (gathered from a table) or None, with at least
    two dims (SDPA's mask needs them).

    Matmul-softmax with the scale folded into q and the bias added in place to the fresh scores; without gradients
    SDPA is the other candidate, and vitkern._tuning keeps whichever is faster for the shape. fp16 and bf16 inputs
    are computed in fp32 (DESIGN.md's numerics), the output cast back.
    """
    if q.dtype != torch.float32:
        bias = None if bias is None else bias.float()
        return _cpu_attention(q.float(), k.float(), v.float(), bias, scale).to(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    batch, heads, queries, head_dim = q.shape
    keys, value_dim = k.shape[2], v.shape[3]
    macs = batch * heads * queries * keys * (head_dim + value_dim)
    if not needs_grad(q, k, v, bias) and _tuning.worth_tuning(macs, backward=False):
        bias_shape = None if bias is None else tuple(bias.shape)
        threads = torch.get_num_threads()
        key = ("attention", batch, heads, queries, keys, head_dim, value_dim, bias_shape, q.dtype, threads)

        def candidates():
            return {
                "matmul": lambda: _matmul_softmax(q, k, v, bias, scale),
                "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale),
            }

        if _tuning.choose(key, candidates, "matmul") == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    return _matmul_softmax(q, k, v, bias, scale)


def _may_mask_rows(bias: torch.Tensor) -> bool:
    """Whether a dense bias may hold -inf, which needs the reference's fully-masked-row handling. Under
    torch.compile the answer is yes without looking (a data-dependent branch would break the graph)."""
    return torch.compiler.is_compiling() or bool(bias.isneginf().any())


def _matmul_softmax(q, k, v, bias, scale):
    scores = torch.matmul(q * scale, k.transpose(-1, -2))
    if bias is not None:
        scores.add_(bias)
    return torch.matmul(scores.softmax(-1), v)


@functools.lru_cache(maxsize=16)
def _cached_index(build, *args):
    with torch.inference_mode(False):  # a normal tensor even when first asked for under inference_mode
        return build(*args).flatten()


def _rel_pos_flat_index(window: tuple[int, int], device: torch.device) -> torch.Tensor:
    """reference.rel_pos_index flattened, kept per window and device up to CPU_MAX_CACHED_INDEX entries (built
    afresh under torch.compile, which traces the build into the graph)."""
    tokens = window[0] * window[1]
    if tokens * tokens > CPU_MAX_CACHED_INDEX or torch.compiler.is_compiling():
        return reference.rel_pos_index(window, device).flatten()
    return _cached_index(reference.rel_pos_index, window, device)


def _levit_flat_index(resolution: int, stride: int, device: torch.device) -> torch.Tensor:
    """reference.levit_index flattened, kept per resolution, stride and device like _rel_pos_flat_index."""
    keys = resolution * resolution
    if keys * ((resolution - 1) // stride + 1) ** 2 > CPU_MAX_CACHED_INDEX or torch.compiler.is_compiling():
        return reference.levit_index(resolution, stride, device).flatten()
    return _cached_index(reference.levit_index, resolution, stride, device)


def _fused(q, k, v, bias, bias_mode, geometry, scale, impl, op):
    if impl != "triton":
        raise RuntimeError(
            f"{op}: backend 'cuda' has no CUDA C++ attention kernel; the fused attention is Triton "
            "(use vitkern.backend('triton') or 'auto')"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, _ = torch.ops.vitkern.attention(q, k, v, bias, bias_mode, geometry, scale, impl)
    return out


def _kernels():
    return importlib.import_module("vitkern.kernels.attention")


@torch.library.custom_op("vitkern::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    bias_mode: int,
    geometry: list[int],
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(_kernels().attention_fwd(q, k, v, bias, bias_mode, geometry, scale))


@_attention_op.register_fake
def _(q, k, v, bias, bias_mode, geometry, scale, backend):
    batch, heads, queries, _ = q.shape
    out = q.new_empty((batch, heads, queries, v.shape[3]))
    lse = q.new_empty((batch, heads, queries), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("vitkern::attention_backward", mutates_args=())
def _attention_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bias: torch.Tensor | None,
    bias_mode: int,
    geometry: list[int],
    scale: float,
    bias_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(
        _kernels().attention_bwd(dout, q, k, v, out, lse, bias, bias_mode, geometry, scale, bias_grad)
    )


@_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, bias, bias_mode, geometry, scale, bias_grad, backend):
    dbias = bias.new_empty(bias.shape) if bias_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


def _setup_context(ctx, inputs, output):
    q, k, v, bias, bias_mode, geometry, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias)
    ctx.args = (bias_mode, geometry, scale)
    ctx.backend = backend


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, bias = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = torch.ops.vitkern.attention_backward(
        dout.contiguous(), q, k, v, out, lse, bias, *ctx.args, bias_grad, ctx.backend
    )
    return dq, dk, dv, dbias if bias_grad else None, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)
