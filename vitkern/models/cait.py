"""CaiT: Going deeper with image transformers (Touvron et al. 2021, arXiv:2103.17239).

Patch tokens go through ``depth`` self-attention blocks without a class token; the class token joins only in the
last ``depth_token_only`` (2) class-attention blocks, where it alone is the query and the patches stay fixed. Every
residual branch is scaled per channel by LayerScale. Parameter counts of the named configurations (CaiT paper,
facebookresearch/deit ``cait_models.py``): XXS-24 12.0M, XXS-36 17.3M, S-24 46.9M.

The self-attention blocks use talking-heads attention as in the paper: the heads' scores are mixed by a learned
H x H projection before the softmax and the weights again after it, so this attention cannot run through
``F.scaled_dot_product_attention`` and is plain PyTorch on every backend. Class attention is plain softmax
attention of one query and uses SDPA off the ``eager`` backend.

Departures from lucidrains/vit-pytorch (``vit_pytorch/cait.py``), following the paper and its code
(facebookresearch/deit ``cait_models.py``): talking-heads attention (vit-pytorch has plain attention); LayerScale's
initial value depends on the network's total depth (0.1 up to 18 blocks, 1e-5 up to 24, 1e-6 beyond; vit-pytorch
applies that rule to each block's index instead); class-attention blocks update only the class token
(vit-pytorch's ``context`` form, kept here as ``CrossAttention(..., kv_include_self=True)``); qkv biases and
LayerNorm eps 1e-6 as in the paper's code; the head reads the class token after a final LayerNorm.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from vitkern.models._layers import Attention, Block, CrossAttention, VisionTransformer, layer_norm
from vitkern.models._registry import _create, register_model


def layer_scale_init(depth: int) -> float:
    """The paper's LayerScale initialisation for a network of ``depth`` blocks (section 2)."""
    if depth <= 18:
        return 0.1
    if depth <= 24:
        return 1e-5
    return 1e-6


class TalkingHeadAttention(Attention):
    """Talking-heads self-attention (Shazeer et al. 2020): scores mixed across heads by ``proj_l`` before the
    softmax, weights mixed by ``proj_w`` after it. x: (B, N, dim) -> (B, N, dim). Plain PyTorch on every backend."""

    def __init__(self, dim: int, num_heads: int = 8, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.proj_l = nn.Linear(num_heads, num_heads)
        self.proj_w = nn.Linear(num_heads, num_heads)

    @staticmethod
    def mix_heads(proj: nn.Linear, attn: torch.Tensor) -> torch.Tensor:
        """(B, H, N, N) maps -> ``proj`` applied across the head axis at every (i, j), (B, H, N, N)."""
        return rearrange(proj(rearrange(attn, "b h i j -> b i j h")), "b i j h -> b h i j")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        attn = torch.matmul(q * self.scale, k.transpose(-1, -2))
        attn = self.mix_heads(self.proj_l, attn).softmax(dim=-1)
        attn = self.mix_heads(self.proj_w, attn)
        attn = F.dropout(attn, self.attn_drop, self.training)
        return self.project(torch.matmul(attn, v))


class ClassAttentionBlock(Block):
    """Class-attention block: the class token attends to itself and the patches (:class:`CrossAttention`), then
    goes through the Mlp; the patches are left unchanged. cls: (B, 1, dim), x: (B, N, dim) -> (B, 1, dim). The
    other keywords are :class:`Block`'s."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, init_values: float = 1e-5, **kwargs) -> None:
        super().__init__(
            dim,
            num_heads,
            qkv_bias=qkv_bias,
            init_values=init_values,
            norm_layer=layer_norm,
            attn_layer=CrossAttention,
            **kwargs,
        )

    def forward(self, cls: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        attended = self.attn(self.norm1(cls), context=self.norm1(x), kv_include_self=True)
        cls = cls + self.drop_path1(self.ls1(attended))
        return cls + self.drop_path2(self.ls2(self.mlp(self.norm2(cls))))


class CaiT(VisionTransformer):
    """Class-attention image transformer. Input (B, in_chans, img_size, img_size) -> logits (B, num_classes).

    ``depth`` talking-heads blocks (``patch_transformer``) on the patches, then ``depth_token_only``
    class-attention blocks (``cls_transformer``); ``init_values`` None takes :func:`layer_scale_init` of ``depth``.
    The other keywords are :class:`VisionTransformer`'s; the defaults are CaiT-XXS-24's.
    """

    blocks_name = "patch_transformer"

    def __init__(
        self,
        embed_dim: int = 192,
        depth: int = 24,
        num_heads: int = 4,
        depth_token_only: int = 2,
        init_values: float | None = None,
        **kwargs,
    ) -> None:
        init_values = layer_scale_init(depth) if init_values is None else init_values
        super().__init__(
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            late_class_token=True,
            init_values=init_values,
            attn_layer=TalkingHeadAttention,
            **kwargs,
        )
        self.cls_transformer = nn.ModuleList(
            ClassAttentionBlock(
                embed_dim, num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias, init_values=init_values
            )
            for _ in range(depth_token_only)
        )
        self.init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, 1 + patches, embed_dim) normalised tokens, the class token first."""
        x = self.patch_transformer(self.embed_tokens(x))
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        for block in self.cls_transformer:
            cls = block(cls, x)
        return self.norm(torch.cat((cls, x), dim=1))


def _cait(embed_dim: int, depth: int, num_heads: int, overrides: dict) -> CaiT:
    return _create(CaiT, dict(patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=num_heads), overrides)


@register_model
def cait_xxs24_224(**kwargs) -> CaiT:
    """CaiT-XXS-24: 192 wide, 24 + 2 blocks of 4 heads (12.0M parameters in the paper)."""
    return _cait(192, 24, 4, kwargs)


@register_model
def cait_xxs36_224(**kwargs) -> CaiT:
    """CaiT-XXS-36: 192 wide, 36 + 2 blocks of 4 heads (17.3M parameters in the paper)."""
    return _cait(192, 36, 4, kwargs)


@register_model
def cait_s24_224(**kwargs) -> CaiT:
    """CaiT-S-24: 384 wide, 24 + 2 blocks of 8 heads (46.9M parameters in the paper)."""
    return _cait(384, 24, 8, kwargs)
