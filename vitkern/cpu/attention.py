"""The CPU path of the attention ops (``auto`` on CPU tensors): the bias gathered with a cached index, then
matmul-softmax or SDPA, whichever is faster for the shape (:mod:`vitkern._tuning`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from vitkern import _tuning, reference
from vitkern._grad import needs_grad
from vitkern.kernels.contract import levit_query_side

# The CPU path keeps the (Nq, Nk) gather index of each window or resolution it has seen, up to this many entries
# per index (8 MiB of int64): a 4096-token window's 16.8M-entry index is rebuilt instead.
MAX_CACHED_INDEX = 1 << 20


def rel_pos_attention(q, k, v, table, window, scale, mask=None):
    """:func:`vitkern.ops.rel_pos_attention` on checked arguments; window is (Wh, Ww). A mask that may hold -inf
    takes the reference (zeros for fully masked rows); a finite one is added to the gathered bias once per window,
    (num_windows, heads, N, N), which the batch, viewed as (B / num_windows, num_windows, ...), broadcasts over. A
    table that may hold -inf takes the reference too, as the kernels give zeros for fully masked rows."""
    if _may_mask_rows(table):
        return reference.rel_pos_attention(q, k, v, table, window, scale, mask)
    tokens = window[0] * window[1]
    bias = table.t().index_select(1, _rel_pos_flat_index(window, q.device)).view(-1, tokens, tokens)
    if mask is None:
        return attention(q, k, v, bias, scale)
    if _may_mask_rows(mask):
        return reference.rel_pos_attention(q, k, v, table, window, scale, mask)
    windows = mask.shape[0]
    batch, heads = q.shape[:2]
    per_window = bias + mask[:, None]
    q5, k5, v5 = (t.reshape(batch // windows, windows, heads, *t.shape[2:]) for t in (q, k, v))
    return attention(q5, k5, v5, per_window, scale).reshape(batch, heads, tokens, v.shape[-1])


def levit_attention(q, k, v, biases, resolution, stride, scale):
    """:func:`vitkern.ops.levit_attention` on checked arguments; biases that may hold -inf take the reference."""
    if _may_mask_rows(biases):
        return reference.levit_attention(q, k, v, biases, resolution, stride, scale)
    queries, keys = levit_query_side(resolution, stride) ** 2, resolution * resolution
    bias = biases.index_select(1, _levit_flat_index(resolution, stride, q.device)).view(-1, queries, keys)
    return attention(q, k, v, bias, scale)


def biased_attention(q, k, v, bias, scale):
    """:func:`vitkern.ops.biased_attention` on checked arguments. A bias that may hold -inf takes the reference,
    which gives zeros for fully masked rows."""
    if bias is not None and _may_mask_rows(bias):
        return reference.biased_attention(q, k, v, bias, scale)
    bias4 = None if bias is None else bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    return attention(q, k, v, bias4, scale)


def attention(q, k, v, bias, scale):
    """The CPU attention, for a bias that is finite (gathered from a table) or None, with at least
    two dims (SDPA's mask needs them).

    Matmul-softmax with the scale folded into q and the bias added in place to the fresh scores; without gradients
    SDPA is the other candidate, and vitkern._tuning keeps whichever is faster for the shape. fp16 and bf16 inputs
    are computed in fp32 (DESIGN.md's numerics), the output cast back.
    """
    if q.dtype != torch.float32:
        bias = None if bias is None else bias.float()
        return attention(q.float(), k.float(), v.float(), bias, scale).to(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    *lead, queries, head_dim = q.shape  # (B, heads) or, for a windowed mask, (B / windows, windows, heads)
    keys, value_dim = k.shape[-2], v.shape[-1]
    macs = q.numel() // head_dim * keys * (head_dim + value_dim)
    if not needs_grad(q, k, v, bias) and _tuning.worth_tuning(macs, backward=False):
        bias_shape = None if bias is None else tuple(bias.shape)
        threads = torch.get_num_threads()
        key = ("attention", *lead, queries, keys, head_dim, value_dim, bias_shape, q.dtype, threads)

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
    """reference.rel_pos_index flattened, kept per window and device up to MAX_CACHED_INDEX entries (built
    afresh under torch.compile, which traces the build into the graph)."""
    tokens = window[0] * window[1]
    if tokens * tokens > MAX_CACHED_INDEX or torch.compiler.is_compiling():
        return reference.rel_pos_index(window, device).flatten()
    return _cached_index(reference.rel_pos_index, window, device)


def _levit_flat_index(resolution: int, stride: int, device: torch.device) -> torch.Tensor:
    """reference.levit_index flattened, kept per resolution, stride and device like _rel_pos_flat_index."""
    keys = resolution * resolution
    if keys * levit_query_side(resolution, stride) ** 2 > MAX_CACHED_INDEX or torch.compiler.is_compiling():
        return reference.levit_index(resolution, stride, device).flatten()
    return _cached_index(reference.levit_index, resolution, stride, device)
