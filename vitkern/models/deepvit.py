"""DeepViT: Towards Deeper Vision Transformer (Zhou et al. 2021, arXiv:2103.11886).

Re-attention mixes the softmax attention maps of the heads with a learned H x H matrix before they weigh the
values: ``Norm(Theta^T softmax(q k^T / sqrt(d))) v``. The mixed map is no softmax of scores, so re-attention cannot
run through ``F.scaled_dot_product_attention``: it is plain PyTorch (matmul, softmax, mix, norm, matmul) on every
backend. The blocks without re-attention are plain attention and use SDPA off the ``eager`` backend.

Named configurations follow the official code (github.com/zhoudaquan/dvit_repo, ``deepvit_S``, ``deepvit_L``):
a 3-layer convolutional stem as in T2T-ViT's comparison, 12 heads, MLP ratio 3, qkv biases, residual branches that
see ``x * 0.5`` and are divided by 0.5 (``scale_adjustment``), re-attention in the last 5 of 16 blocks (S, 396
wide) and the last 12 of 32 (L, 420 wide). The paper's comparison with the state of the art gives DeepViT-S 27M
parameters (6.2G MACs, 82.3% top-1) and DeepViT-L 55M (12.5G, 83.1%), figures the CoAtNet and MaxViT papers
repeat; ``deepvit_s`` here has 27.3M. The official DeepViT-L configuration has 58.9M, 7% above the paper's 55M:
this module reproduces the official configuration and does not alter it to hit the printed number.

Departures from lucidrains/vit-pytorch (``vit_pytorch/deepvit.py``, ``ReAttention``), following the paper's code
(zhoudaquan/dvit_repo ``models/deep_vision_transformer.py``): the head-mixing Norm is a BatchNorm over the head
channel (vit-pytorch uses LayerNorm over heads), the mixed map is multiplied by the attention scale when
``transform_scale`` (DeepViT-S), and the mixing matrix ``reattn_weights`` has no bias (the official 1x1
convolution's bias is cancelled by the BatchNorm's mean subtraction); ``reattn_weights`` starts from vit-pytorch's
standard normal draw.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitkern.models._layers import (
    Attention,
    Block,
    PatchEmbed,
    VisionTransformer,
    check_image_size,
    to_pair,
    to_tokens,
)
from vitkern.models._registry import _create, register_model

STEM_CHANNELS = 64


class ReAttention(Attention):
    """Re-attention: softmax attention maps mixed across heads, then BatchNorm over heads.

    x: (B, N, dim) -> (B, N, dim). Plain PyTorch on every backend (the head mixing sits between the softmax and the
    product with v, which SDPA cannot express).
    """

    def __init__(self, dim: int, num_heads: int = 8, transform_scale: bool = False, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.reattn_weights = nn.Parameter(torch.randn(num_heads, num_heads))
        self.reattn_norm = nn.BatchNorm2d(num_heads)
        self.reattn_scale = self.scale if transform_scale else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        attn = (torch.matmul(q, k.transpose(-1, -2)) * self.scale).softmax(dim=-1)
        attn = F.dropout(attn, self.attn_drop, self.training)
        attn = torch.einsum("bhij,hg->bgij", attn, self.reattn_weights)
        attn = self.reattn_norm(attn) * self.reattn_scale
        return self.project(torch.matmul(attn, v))


class DeepViTBlock(Block):
    """Pre-norm block whose residual branches see ``x * a`` and are divided by ``a`` (``a`` = scale_adjustment),
    as the official DeepViT block. x: (B, N, dim) -> (B, N, dim)."""

    def __init__(self, dim: int, num_heads: int, scale_adjustment: float = 1.0, **kwargs) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.scale_adjustment = scale_adjustment

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.scale_adjustment
        x = x + self.drop_path1(self.attn(self.norm1(x * a)) / a)
        return x + self.drop_path2(self.mlp(self.norm2(x * a)) / a)


class DeepViTStem(nn.Module):
    """DeepViT's convolutional patch embedding: 7x7/2 conv, BN, ReLU, 3x3 conv, BN, ReLU, then a
    (patch/2)-strided projection. x: (B, in_chans, *img_size) -> (B, (H / patch) * (W / patch), embed_dim)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = to_pair("img_size", img_size)
        if patch_size % 2 or self.img_size[0] % patch_size or self.img_size[1] % patch_size:
            raise ValueError(
                f"patch_size: expected an even divisor of img_size {self.img_size} for the conv stem, got {patch_size}"
            )
        self.num_patches = (self.img_size[0] // patch_size) * (self.img_size[1] // patch_size)
        self.conv1 = nn.Conv2d(in_chans, STEM_CHANNELS, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.conv2 = nn.Conv2d(STEM_CHANNELS, STEM_CHANNELS, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(STEM_CHANNELS)
        self.relu = nn.ReLU()
        self.proj = nn.Conv2d(STEM_CHANNELS, embed_dim, kernel_size=patch_size // 2, stride=patch_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_size(x, self.img_size)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return to_tokens(self.proj(x))


class DeepViT(VisionTransformer):
    """ViT with re-attention in the blocks listed by ``re_attention`` (one bool per block; None: every block).

    Input (B, in_chans, img_size, img_size) -> logits (B, num_classes). ``use_cnn_embed`` embeds the patches with
    :class:`DeepViTStem` (else :class:`PatchEmbed`); ``transform_scale`` and ``scale_adjustment`` as in
    :class:`ReAttention` and :class:`DeepViTBlock`. The other keywords are :class:`VisionTransformer`'s; the
    defaults are DeepViT-S's sizes.
    """

    def __init__(
        self,
        embed_dim: int = 396,
        depth: int = 16,
        num_heads: int = 12,
        mlp_ratio: float = 3.0,
        re_attention: tuple[bool, ...] | None = None,
        transform_scale: bool = False,
        scale_adjustment: float = 1.0,
        use_cnn_embed: bool = True,
        **kwargs,
    ) -> None:
        re_attention = (True,) * depth if re_attention is None else tuple(re_attention)
        if len(re_attention) != depth:
            raise ValueError(f"re_attention: expected one flag per block ({depth}), got {len(re_attention)}")
        reattention = partial(ReAttention, transform_scale=transform_scale)
        super().__init__(
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            embed_layer=DeepViTStem if use_cnn_embed else PatchEmbed,
            block_layer=DeepViTBlock,
            attn_layer=[reattention if mixed else Attention for mixed in re_attention],
            scale_adjustment=scale_adjustment,
            **kwargs,
        )
        self.init_weights()


def _deepvit(embed_dim: int, depth: int, num_re_attention: int, transform_scale: bool, overrides: dict) -> DeepViT:
    """The official configurations: 16x16 patches through the conv stem, 12 heads, MLP ratio 3, residual branches
    scaled by 0.5, re-attention in the last ``num_re_attention`` blocks."""
    config = dict(
        patch_size=16,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=12,
        mlp_ratio=3.0,
        re_attention=(False,) * (depth - num_re_attention) + (True,) * num_re_attention,
        transform_scale=transform_scale,
        scale_adjustment=0.5,
        use_cnn_embed=True,
    )
    return _create(DeepViT, config, overrides)


@register_model
def deepvit_s(**kwargs) -> DeepViT:
    """DeepViT-S: 396 wide, 16 blocks, re-attention in the last 5 (27M parameters in the paper)."""
    return _deepvit(396, 16, 5, True, kwargs)


@register_model
def deepvit_l(**kwargs) -> DeepViT:
    """DeepViT-L: 420 wide, 32 blocks, re-attention in the last 12 (55M parameters in the paper; this official
    configuration has 58.9M, see the module docstring)."""
    return _deepvit(420, 32, 12, False, kwargs)
