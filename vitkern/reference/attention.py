"""Plain-PyTorch oracles for the biased attention ops.

Every function takes q, k, v as (batch, heads, tokens, head_dim) and computes
``softmax(scale * q @ k^T + bias) @ v``; a query row whose every score is -inf gives zeros.
"""

from __future__ import annotations

import torch


def rel_pos_index(window: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """(N, N) index into a ((2Wh-1)(2Ww-1), heads) table, N = Wh*Ww tokens in row-major order:
    ``(yi - yj + Wh - 1) * (2Ww - 1) + (xi - xj + Ww - 1)`` as CoAtNet, Swin and timm compute it."""
    wh, ww = window
    ys, xs = torch.meshgrid(torch.arange(wh, device=device), torch.arange(ww, device=device), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + wh - 1
    dx = xs[:, None] - xs[None, :] + ww - 1
    return dy * (2 * ww - 1) + dx


def rel_pos_bias(table: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Gather the (heads, N, N) bias from ``table`` ((2Wh-1)(2Ww-1), heads)."""
    index = rel_pos_index(window, table.device)
    return table[index].permute(2, 0, 1)


def levit_index(resolution: int, stride: int = 1, device: torch.device | None = None) -> torch.Tensor:
    """(Nq, Nk) index into LeViT's (heads, R*R) biases: keys on the R x R grid, queries on the stride-s grid
    (ceil(R/s)^2 of them); ``|s*yi - yj| * R + |s*xi - xj|`` as timm's ``Attention``/``AttentionDownsample``."""
    rq = (resolution - 1) // stride + 1
    kys, kxs = torch.meshgrid(
        torch.arange(resolution, device=device), torch.arange(resolution, device=device), indexing="ij"
    )
    qys, qxs = torch.meshgrid(torch.arange(rq, device=device), torch.arange(rq, device=device), indexing="ij")
    kys, kxs = kys.flatten(), kxs.flatten()
    qys, qxs = qys.flatten() * stride, qxs.flatten() * stride
    dy = (qys[:, None] - kys[None, :]).abs()
    dx = (qxs[:, None] - kxs[None, :]).abs()
    return dy * resolution + dx


def levit_bias(biases: torch.Tensor, resolution: int, stride: int = 1) -> torch.Tensor:
    """Gather the (heads, Nq, Nk) bias from ``biases`` (heads, R*R)."""
    return biases[:, levit_index(resolution, stride, biases.device)]


def biased_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Matmul, add, softmax, matmul; ``bias`` broadcastable to (B, heads, Nq, Nk)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    all_masked = torch.isneginf(scores).all(dim=-1, keepdim=True)
    scores = scores.masked_fill(all_masked, 0.0)
    attn = scores.softmax(dim=-1).masked_fill(all_masked, 0.0)
    return torch.matmul(attn, v)


def window_mask_bias(mask: torch.Tensor, batch: int) -> torch.Tensor:
    """A (num_windows, Nq, Nk) mask as the (batch, 1, Nq, Nk) bias that adds mask[b % num_windows] to batch entry b
    (Swin's shifted windows, timm ``swin_transformer.WindowAttention``: windows of one image are consecutive)."""
    return mask.repeat(batch // mask.shape[0], 1, 1).unsqueeze(1)


def rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: torch.Tensor,
    window: tuple[int, int],
    scale: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Relative-position-biased attention; ``mask`` (num_windows, N, N), if given, is added to batch entry b's scores
    as mask[b % num_windows]."""
    bias = rel_pos_bias(table, window).unsqueeze(0)
    if mask is not None:
        bias = bias + window_mask_bias(mask, q.shape[0])
    return biased_attention(q, k, v, bias, scale)


def levit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    biases: torch.Tensor,
    resolution: int,
    stride: int = 1,
    scale: float | None = None,
) -> torch.Tensor:
    return biased_attention(q, k, v, levit_bias(biases, resolution, stride).unsqueeze(0), scale)
