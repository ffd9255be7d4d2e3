"""CrossViT: cross-attention multi-scale vision transformer (Chen et al. 2021, arXiv:2103.14899).

Two branches embed the image at two patch sizes: a small-patch branch (narrow) and a large-patch branch (wide).
Each multi-scale stage runs the branches' own transformer blocks, then fuses them by cross attention: each branch's
class token, projected to the other branch's width, attends to itself and to the other branch's patch tokens, and is
projected back. The logits are the mean of the two branches' heads. Parameter counts of the named configurations
(CrossViT paper, official github.com/IBM/CrossViT): CrossViT-9 8.6M, -15 27.5M, -18 43.3M.

As in the paper's code, the large branch sees the image resized to ``img_size * 224 / 240`` (bicubic): at 240 the
branches have 20x20 patches of 12 and 14x14 patches of 16.

Departures from lucidrains/vit-pytorch (``vit_pytorch/cross_vit.py``), following the paper and its code
(IBM/CrossViT ``models/crossvit.py``): the class-token projections ``f`` and ``g`` are LayerNorm, GELU, Linear
(vit-pytorch's ``ProjectInOut`` is a bare Linear); the fused class token replaces the branch's class token
(vit-pytorch adds it as a residual); the logits are the mean of the two heads (vit-pytorch sums them); qkv biases
and LayerNorm eps 1e-6 as in the paper's code. The heads are ``head`` (state_dicts saved with their former name
``mlp_head`` still load).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitkern.models._layers import (
    INIT_STD,
    Block,
    ClassifierModel,
    CrossAttention,
    DropPath,
    PatchEmbed,
    check_image_size,
    drop_path_rates,
    layer_norm,
    make_head,
    trunc_normal_init,
)
from vitkern.models._registry import _create, register_model

NUM_BRANCHES = 2
PAPER_IMG_SCALE = (1.0, 224 / 240)


def _projection(dim_in: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(layer_norm(dim_in), nn.GELU(), nn.Linear(dim_in, dim_out))


class CrossAttentionBlock(nn.Module):
    """Cross-attention fusion: ``cls + drop_path(attn(norm(cls), norm(patches), kv_include_self=True))``.

    cls: (B, 1, dim), patches: (B, N, dim) -> (B, 1, dim). ``attn_kwargs`` go to :class:`CrossAttention` (qkv
    biases by default).
    """

    def __init__(self, dim: int, num_heads: int, drop_path: float = 0.0, qkv_bias: bool = True, **attn_kwargs) -> None:
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = CrossAttention(dim, num_heads, qkv_bias=qkv_bias, **attn_kwargs)
        self.drop_path = DropPath(drop_path)

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        attended = self.attn(self.norm1(cls), context=self.norm1(patches), kv_include_self=True)
        return cls + self.drop_path(attended)


class MultiScaleBlock(nn.Module):
    """One CrossViT stage: ``depth[b]`` blocks in branch b, then ``max(depth[2], 1)`` cross-attention layers per
    branch. Inputs and outputs: a list of (B, 1 + N_b, dim_b) token tensors, one per branch."""

    def __init__(
        self,
        dims: tuple[int, int],
        depth: tuple[int, int, int],
        num_heads: tuple[int, int],
        mlp_ratio: tuple[float, float, float],
        qkv_bias: bool,
        drop: float,
        attn_drop: float,
        drop_path: list[float],
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        for b in range(NUM_BRANCHES):
            rates = drop_path[: depth[b]]
            self.blocks.append(
                nn.Sequential(
                    *(
                        Block(
                            dims[b],
                            num_heads[b],
                            mlp_ratio[b],
                            qkv_bias=qkv_bias,
                            drop=drop,
                            attn_drop=attn_drop,
                            drop_path=rate,
                            norm_layer=layer_norm,
                        )
                        for rate in rates
                    )
                )
            )
        self.projs = nn.ModuleList()
        self.fusion = nn.ModuleList()
        self.revert_projs = nn.ModuleList()
        for b in range(NUM_BRANCHES):
            other = (b + 1) % NUM_BRANCHES
            self.projs.append(_projection(dims[b], dims[other]))
            self.fusion.append(
                nn.ModuleList(
                    CrossAttentionBlock(
                        dims[other],
                        num_heads[other],
                        drop_path=drop_path[-1],
                        qkv_bias=qkv_bias,
                        attn_drop=attn_drop,
                        proj_drop=drop,
                    )
                    for _ in range(max(depth[2], 1))
                )
            )
            self.revert_projs.append(_projection(dims[other], dims[b]))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = [blocks(x) for blocks, x in zip(self.blocks, xs)]
        outs = []
        for b in range(NUM_BRANCHES):
            other = xs[(b + 1) % NUM_BRANCHES]
            cls = self.projs[b](xs[b][:, :1])
            for layer in self.fusion[b]:
                cls = layer(cls, other[:, 1:])
            outs.append(torch.cat((self.revert_projs[b](cls), xs[b][:, 1:]), dim=1))
        return outs


class BranchHeads(nn.ModuleList):
    """One Linear head per branch on the concatenated class tokens (B, sum(dims)) -> the mean of the branches'
    logits (B, num_classes)."""

    def __init__(self, in_features: int, num_classes: int, dims: tuple[int, ...]) -> None:
        if sum(dims) != in_features:
            raise ValueError(f"dims: expected branch widths summing to {in_features}, got {dims}")
        super().__init__(nn.Linear(dim, num_classes) for dim in dims)
        self.dims = tuple(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(t) for head, t in zip(self, x.split(self.dims, dim=-1))]).mean(dim=0)


class CrossViT(ClassifierModel):
    """Two-branch cross-attention ViT. Input (B, in_chans, img_size, img_size) -> logits (B, num_classes), the mean
    of the branch heads (``head``, a :class:`BranchHeads`)."""

    legacy_head_names = {"mlp_head": "head"}

    def __init__(
        self,
        img_size: int = 240,
        img_scale: tuple[float, float] = PAPER_IMG_SCALE,
        patch_size: tuple[int, int] = (12, 16),
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: tuple[int, int] = (192, 384),
        depth: tuple[tuple[int, int, int], ...] = ((1, 4, 0),) * 3,
        num_heads: tuple[int, int] = (6, 6),
        mlp_ratio: tuple[float, float, float] = (4.0, 4.0, 1.0),
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("img_scale", img_scale),
            ("patch_size", patch_size),
            ("embed_dim", embed_dim),
            ("num_heads", num_heads),
        ):
            if len(value) != NUM_BRANCHES:
                raise ValueError(f"{name}: expected one value per branch ({NUM_BRANCHES}), got {value!r}")
        if not isinstance(img_size, int):
            raise TypeError(f"img_size: expected an int, got {type(img_size).__name__}")
        self.img_size = img_size
        self.branch_sizes = tuple(int(img_size * scale) for scale in img_scale)
        self.num_classes = num_classes
        self.embed_dim = tuple(embed_dim)
        self.num_features = sum(embed_dim)
        self.patch_embed = nn.ModuleList(
            PatchEmbed(size, patch, in_chans, dim) for size, patch, dim in zip(self.branch_sizes, patch_size, embed_dim)
        )
        self.cls_token = nn.ParameterList(nn.Parameter(torch.zeros(1, 1, dim)) for dim in embed_dim)
        self.pos_embedding = nn.ParameterList(
            nn.Parameter(torch.zeros(1, embed.num_patches + 1, dim)) for embed, dim in zip(self.patch_embed, embed_dim)
        )
        self.dropout = nn.Dropout(drop_rate)
        stage_depths = [max(d[0], d[1]) + max(d[2], 1) for d in depth]
        rates = drop_path_rates(drop_path_rate, sum(stage_depths))
        self.blocks = nn.ModuleList()
        start = 0
        for stage_depth, d in zip(stage_depths, depth):
            self.blocks.append(
                MultiScaleBlock(
                    tuple(embed_dim),
                    d,
                    tuple(num_heads),
                    tuple(mlp_ratio),
                    qkv_bias,
                    drop_rate,
                    attn_drop_rate,
                    rates[start : start + stage_depth],
                )
            )
            start += stage_depth
        self.norm = nn.ModuleList(layer_norm(dim) for dim in embed_dim)
        self.reset_classifier(num_classes)
        for param in (*self.pos_embedding, *self.cls_token):
            nn.init.trunc_normal_(param, std=INIT_STD)
        self.apply(trunc_normal_init)

    def new_head(self, num_classes: int) -> nn.Module:
        """A Linear head per branch, their logits averaged (0 classes: the concatenated class tokens)."""
        return make_head(self.num_features, num_classes, partial(BranchHeads, dims=self.embed_dim))

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, H, W) images -> per branch (B, 1 + N_b, dim_b) normalised tokens, the class token first."""
        check_image_size(x, (self.img_size, self.img_size))
        xs = []
        for embed, cls_token, pos, size in zip(self.patch_embed, self.cls_token, self.pos_embedding, self.branch_sizes):
            image = (
                x if size == self.img_size else F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
            )
            tokens = embed(image)
            tokens = torch.cat((cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1) + pos
            xs.append(self.dropout(tokens))
        for stage in self.blocks:
            xs = stage(xs)
        return [norm(t) for norm, t in zip(self.norm, xs)]

    def pool_features(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """Branch tokens -> the concatenated class tokens (B, sum(embed_dim))."""
        return torch.cat([t[:, 0] for t in xs], dim=-1)


def _crossvit(embed_dim: tuple[int, int], branch_depth: int, num_heads: int, overrides: dict) -> CrossViT:
    config = dict(
        img_size=240,
        patch_size=(12, 16),
        embed_dim=embed_dim,
        depth=((1, branch_depth, 0),) * 3,
        num_heads=(num_heads, num_heads),
        mlp_ratio=(3.0, 3.0, 1.0),
        qkv_bias=True,
    )
    return _create(CrossViT, config, overrides)


@register_model
def crossvit_9_240(**kwargs) -> CrossViT:
    """CrossViT-9: branches 128 and 256 wide, 3 stages of (1, 3) blocks, 4 heads (8.6M parameters in the paper)."""
    return _crossvit((128, 256), 3, 4, kwargs)


@register_model
def crossvit_15_240(**kwargs) -> CrossViT:
    """CrossViT-15: branches 192 and 384 wide, 3 stages of (1, 5) blocks, 6 heads (27.5M parameters in the paper)."""
    return _crossvit((192, 384), 5, 6, kwargs)


@register_model
def crossvit_18_240(**kwargs) -> CrossViT:
    """CrossViT-18: branches 224 and 448 wide, 3 stages of (1, 6) blocks, 7 heads (43.3M parameters in the paper)."""
    return _crossvit((224, 448), 6, 7, kwargs)
