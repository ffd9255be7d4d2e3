"""T2T-ViT: Tokens-to-Token ViT (Yuan et al. 2021, arXiv:2101.11986).

The Tokens-to-Token module turns the image into tokens progressively: a soft split (``nn.Unfold``, overlapping
7x7/4, then 3x3/2 twice) concatenates neighbouring tokens, and a one-head token transformer between the splits
re-structures them and shrinks their width to ``token_dim`` (64). A ViT backbone with a class token and a fixed
sinusoidal position table follows. Parameter counts of the named configurations (T2T-ViT paper and the official
github.com/yitu-opensource/T2T-ViT README): T2T-ViT-7 4.3M, -10 5.9M, -12 6.9M, -14 21.5M, -19 39.2M, -24 64.1M.

Departures from lucidrains/vit-pytorch (``vit_pytorch/t2t.py``, ``T2TViT``), following the paper and its code
(yitu-opensource/T2T-ViT ``models/t2t_vit.py``): the token transformers narrow the
concatenated tokens to ``token_dim`` (vit-pytorch keeps their full width, 3 * 7^2 * 3^2 * 3^2 = 11907 for the
default split, far from the paper's model); the attention output is added to the values (the input is wider than the
output, so the residual goes through v); the position embedding is the paper's fixed sinusoid table (a buffer, not
a parameter); qkv projections have no bias. The token mixers here are the paper's transformer layers (the
``T2T-ViT_t`` form) for every configuration: the paper's default T2T-ViT-N configurations use a Performer
approximation of the same layer, whose parameters differ only by the qkv biases (384 parameters) and whose
random features are not parameters.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn

from vitkern.models._layers import (
    Mlp,
    VisionTransformer,
    check_image_size,
    scaled_dot_product,
    to_map,
    to_pair,
)
from vitkern.models._registry import _create, register_model

TOKEN_DIM = 64
T2T_LAYERS = ((7, 4), (3, 2), (3, 2))
SINUSOID_BASE = 10000.0


def conv_output_size(size: int, kernel_size: int, stride: int, padding: int) -> int:
    """Side of the token grid after an unfold (vit-pytorch's ``conv_output_size``)."""
    return (size - kernel_size + 2 * padding) // stride + 1


def sinusoid_table(n_position: int, dim: int) -> torch.Tensor:
    """The transformer's fixed sinusoidal position table, (1, n_position, dim): sin on even channels, cos on odd."""
    position = torch.arange(n_position, dtype=torch.float64)[:, None]
    exponent = 2 * (torch.arange(dim) // 2) / dim
    angles = position / torch.pow(SINUSOID_BASE, exponent.double())[None, :]
    table = torch.where(torch.arange(dim) % 2 == 0, torch.sin(angles), torch.cos(angles))
    return table.float().unsqueeze(0)


class TokenAttention(nn.Module):
    """One-head attention that narrows tokens from ``dim`` to ``in_dim``, the residual taken through the values.

    x: (B, N, dim) -> (B, N, in_dim). The scale is dim ** -0.5 (the input width) as in the paper's code.
    """

    def __init__(
        self, dim: int, in_dim: int, qkv_bias: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        self.scale = dim**-0.5
        self.attn_drop = attn_drop
        self.to_qkv = nn.Linear(dim, in_dim * 3, bias=qkv_bias)
        self.to_out = nn.Linear(in_dim, in_dim)
        self.out_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unsqueeze(1) for t in self.to_qkv(x).chunk(3, dim=-1))
        out = scaled_dot_product(q, k, v, self.scale, self.attn_drop if self.training else 0.0).squeeze(1)
        return v.squeeze(1) + self.out_drop(self.to_out(out))


class TokenTransformer(nn.Module):
    """The T2T module's transformer layer: TokenAttention, then a residual Mlp at width ``in_dim``.

    x: (B, N, dim) -> (B, N, in_dim).
    """

    def __init__(
        self, dim: int, in_dim: int, mlp_ratio: float = 1.0, drop: float = 0.0, attn_drop: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TokenAttention(dim, in_dim, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(in_dim)
        self.mlp = Mlp(in_dim, int(in_dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokensToToken(nn.Module):
    """Soft splits and token transformers: (B, in_chans, *img_size) -> (B, grid * grid, embed_dim).

    ``patch_size`` is the soft splits' total stride, taken from ``t2t_layers`` (16 for the default splits); a value
    given is checked against it.
    """

    def __init__(
        self,
        img_size: int,
        in_chans: int,
        embed_dim: int,
        token_dim: int = TOKEN_DIM,
        t2t_layers: tuple[tuple[int, int], ...] = T2T_LAYERS,
        patch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.img_size = to_pair("img_size", img_size)
        if self.img_size[0] != self.img_size[1]:
            raise ValueError(f"img_size: expected a square image size, got {self.img_size}")
        self.patch_size = math.prod(stride for _, stride in t2t_layers)
        if patch_size is not None and patch_size != self.patch_size:
            raise ValueError(
                f"patch_size: expected the total stride {self.patch_size} of the soft splits {t2t_layers}, got "
                f"{patch_size}"
            )
        self.soft_splits = nn.ModuleList()
        self.transformers = nn.ModuleList()
        self.grid_sizes: list[int] = []
        size, width = self.img_size[0], in_chans
        for i, (kernel_size, stride) in enumerate(t2t_layers):
            if i > 0:
                self.transformers.append(TokenTransformer(width, token_dim))
                width = token_dim
            self.soft_splits.append(nn.Unfold(kernel_size=kernel_size, stride=stride, padding=stride // 2))
            size = conv_output_size(size, kernel_size, stride, stride // 2)
            if size < 1:
                raise ValueError(f"img_size: {self.img_size[0]} is too small for the soft splits {t2t_layers}")
            self.grid_sizes.append(size)
            width *= kernel_size**2
        self.num_patches = size * size
        self.project = nn.Linear(width, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_size(x, self.img_size)
        x = self.soft_splits[0](x).transpose(1, 2)
        for split, transformer, grid in zip(self.soft_splits[1:], self.transformers, self.grid_sizes):
            x = split(to_map(transformer(x), (grid, grid))).transpose(1, 2)
        return self.project(x)


class T2TViT(VisionTransformer):
    """Tokens-to-Token ViT. Input (B, in_chans, img_size, img_size) -> logits (B, num_classes).

    The patch embedding is :class:`TokensToToken` (``token_dim``, ``t2t_layers``; no ``patch_size`` of its own),
    the position embedding the fixed :func:`sinusoid_table`. The other keywords are :class:`VisionTransformer`'s;
    the defaults are T2T-ViT-14's, without qkv biases.
    """

    def __init__(
        self,
        embed_dim: int = 384,
        depth: int = 14,
        num_heads: int = 6,
        mlp_ratio: float = 3.0,
        qkv_bias: bool = False,
        token_dim: int = TOKEN_DIM,
        t2t_layers: tuple[tuple[int, int], ...] = T2T_LAYERS,
        **kwargs,
    ) -> None:
        super().__init__(
            patch_size=None,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            embed_layer=partial(TokensToToken, token_dim=token_dim, t2t_layers=t2t_layers),
            norm_layer=nn.LayerNorm,
            pos_embed=sinusoid_table,
            **kwargs,
        )
        self.init_weights()


def _t2t(embed_dim: int, depth: int, num_heads: int, mlp_ratio: float, overrides: dict) -> T2TViT:
    return _create(T2TViT, dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio), overrides)


@register_model
def t2t_vit_7(**kwargs) -> T2TViT:
    """T2T-ViT-7: 256 wide, 7 blocks of 4 heads, MLP ratio 2 (4.3M parameters in the paper)."""
    return _t2t(256, 7, 4, 2.0, kwargs)


@register_model
def t2t_vit_10(**kwargs) -> T2TViT:
    """T2T-ViT-10: 256 wide, 10 blocks of 4 heads, MLP ratio 2 (5.9M parameters in the paper)."""
    return _t2t(256, 10, 4, 2.0, kwargs)


@register_model
def t2t_vit_12(**kwargs) -> T2TViT:
    """T2T-ViT-12: 256 wide, 12 blocks of 4 heads, MLP ratio 2 (6.9M parameters in the paper)."""
    return _t2t(256, 12, 4, 2.0, kwargs)


@register_model
def t2t_vit_14(**kwargs) -> T2TViT:
    """T2T-ViT-14: 384 wide, 14 blocks of 6 heads, MLP ratio 3 (21.5M parameters in the paper)."""
    return _t2t(384, 14, 6, 3.0, kwargs)


@register_model
def t2t_vit_19(**kwargs) -> T2TViT:
    """T2T-ViT-19: 448 wide, 19 blocks of 7 heads, MLP ratio 3 (39.2M parameters in the paper)."""
    return _t2t(448, 19, 7, 3.0, kwargs)


@register_model
def t2t_vit_24(**kwargs) -> T2TViT:
    """T2T-ViT-24: 512 wide, 24 blocks of 8 heads, MLP ratio 3 (64.1M parameters in the paper)."""
    return _t2t(512, 24, 8, 3.0, kwargs)
