"""PiT, the pooling-based vision transformer ("Rethinking Spatial Dimensions of Vision Transformers", Heo et al.,
ICCV 2021).

An overlapping patch embedding (a ``patch x patch`` convolution with stride ``patch // 2``) plus a learned 2-D
position embedding and a class token, then transformer stages separated by pooling layers. A pooling layer doubles
the channels and halves the token grid with a depthwise (channel multiplier 2) 3x3 stride-2 convolution, and maps the
class token with a Linear layer (the seed's ``Pool``: ``downsample``, ``cls_ff``). The head is LayerNorm + Linear on
the class token.

Backends: on ``eager`` every layer is the plain PyTorch module and attention is matmul-softmax; on the other
backends the pooling convolution runs :func:`vitkern.ops.depthwise_conv2d` (each input channel repeated twice, which
is what a ``groups=C``, ``2C``-output convolution computes) and attention runs SDPA.

Departures from the seed (``shared/seeds/deepvit_..._cvt_article.txt``), following the paper and its official code:
the pooling convolution is the channel-multiplier-2 depthwise convolution alone, without the seed's extra 1x1
convolution; the transformer blocks use ``dim / heads`` = 32 or 48 or 64 wide heads with qkv biases and MLP ratio 4
(the seed's ``dim_head=64``/``mlp_dim`` blocks); the position embedding is a (1, C, H, W) map added before the class
token is prepended, so the class token has no position embedding.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from vitkern._backend import current_backend
from vitkern.models import register_model
from vitkern.models._layers import (
    Block,
    ClassifierModel,
    check_image_size,
    init_weights,
    make_head,
    to_pair,
)
from vitkern.ops.depthwise_conv import depthwise_conv2d

LN_EPS = 1e-6
POS_EMBED_STD = 0.02


class Pool(nn.Module):
    """PiT's pooling layer: tokens (B, C, H, W) -> (B, C_out, ceil(H/2), ceil(W/2)) by a grouped 3x3 stride-2
    convolution (``groups=C``, C_out a multiple of C), the class token (B, 1, C) -> (B, 1, C_out) by a Linear."""

    def __init__(self, dim: int, dim_out: int, stride: int = 2) -> None:
        super().__init__()
        if dim_out % dim:
            raise ValueError(f"dim_out: expected a multiple of dim {dim}, got {dim_out}")
        self.downsample = nn.Conv2d(dim, dim_out, stride + 1, stride, stride // 2, groups=dim)
        self.cls_ff = nn.Linear(dim, dim_out)

    def pool_tokens(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.downsample
        if current_backend() == "eager":
            return conv(x)
        multiplier = conv.out_channels // conv.in_channels
        return depthwise_conv2d(
            x.repeat_interleave(multiplier, dim=1), conv.weight.to(x.dtype), conv.bias.to(x.dtype), conv.stride,
            conv.padding,
        )

    def forward(self, x: torch.Tensor, cls_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool_tokens(x), self.cls_ff(cls_token)


class Transformer(nn.Module):
    """One PiT stage: the class token and the flattened (B, C, H, W) tokens through ``depth`` blocks."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        norm = partial(nn.LayerNorm, eps=LN_EPS)
        self.blocks = nn.Sequential(
            *[Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)]
        )

    def forward(self, x: torch.Tensor, cls_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        tokens = torch.cat((cls_token, x.flatten(2).transpose(1, 2)), dim=1)
        tokens = self.blocks(tokens)
        cls_token, x = tokens[:, :1], tokens[:, 1:]
        return x.transpose(1, 2).reshape(b, c, h, w), cls_token


class PiT(ClassifierModel):
    """PiT: (B, in_chans, img_size, img_size) -> (B, num_classes).

    Args:
        img_size: the input side; the position embedding is sized for it, another size raises ValueError.
        patch_size, stride: the patch embedding's kernel and stride (the paper: 16 and 8, or 14 and 7 for PiT-B).
        base_dims: the head width of each stage; stage i has ``base_dims[i] * heads[i]`` channels.
        depth: blocks per stage. heads: attention heads per stage.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        stride: int = 8,
        base_dims: tuple[int, ...] = (48, 48, 48),
        depth: tuple[int, ...] = (2, 6, 4),
        heads: tuple[int, ...] = (2, 4, 8),
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        if not len(base_dims) == len(depth) == len(heads):
            raise ValueError(
                f"base_dims, depth, heads: expected one entry per stage each, got {len(base_dims)}, {len(depth)}, "
                f"{len(heads)}"
            )
        self.img_size = to_pair("img_size", img_size)
        grid_h = (self.img_size[0] - patch_size) // stride + 1
        grid_w = (self.img_size[1] - patch_size) // stride + 1
        if grid_h < 1 or grid_w < 1:
            raise ValueError(f"img_size: expected at least patch_size {patch_size}, got {img_size}")
        dims = [b * h for b, h in zip(base_dims, heads)]
        self.num_classes = num_classes
        self.num_features = dims[-1]
        self.to_patch_embedding = nn.Conv2d(in_chans, dims[0], patch_size, stride)
        self.pos_embedding = nn.Parameter(torch.zeros(1, dims[0], grid_h, grid_w))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dims[0]))
        self.transformers = nn.ModuleList(
            [Transformer(dim, d, h, mlp_ratio) for dim, d, h in zip(dims, depth, heads)]
        )
        self.pools = nn.ModuleList([Pool(dims[i], dims[i + 1]) for i in range(len(dims) - 1)])
        self.norm = nn.LayerNorm(dims[-1], eps=LN_EPS)
        self.head = make_head(dims[-1], num_classes)
        nn.init.trunc_normal_(self.pos_embedding, std=POS_EMBED_STD)
        nn.init.trunc_normal_(self.cls_token, std=POS_EMBED_STD)
        self.apply(init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> the normalised class token (B, num_features)."""
        check_image_size(x, self.img_size)
        x = self.to_patch_embedding(x) + self.pos_embedding
        cls_token = self.cls_token.expand(x.shape[0], -1, -1)
        for stage, transformer in enumerate(self.transformers):
            if stage > 0:
                x, cls_token = self.pools[stage - 1](x, cls_token)
            x, cls_token = transformer(x, cls_token)
        return self.norm(cls_token[:, 0])


@register_model
def pit_ti_224(num_classes: int = 1000, **kwargs) -> PiT:
    """PiT-Ti (4.9 M parameters)."""
    return PiT(patch_size=16, stride=8, base_dims=(32, 32, 32), depth=(2, 6, 4), heads=(2, 4, 8),
               num_classes=num_classes, **kwargs)


@register_model
def pit_xs_224(num_classes: int = 1000, **kwargs) -> PiT:
    """PiT-XS (10.6 M parameters)."""
    return PiT(patch_size=16, stride=8, base_dims=(48, 48, 48), depth=(2, 6, 4), heads=(2, 4, 8),
               num_classes=num_classes, **kwargs)


@register_model
def pit_s_224(num_classes: int = 1000, **kwargs) -> PiT:
    """PiT-S (23.5 M parameters)."""
    return PiT(patch_size=16, stride=8, base_dims=(48, 48, 48), depth=(2, 6, 4), heads=(3, 6, 12),
               num_classes=num_classes, **kwargs)


@register_model
def pit_b_224(num_classes: int = 1000, **kwargs) -> PiT:
    """PiT-B (73.8 M parameters)."""
    return PiT(patch_size=14, stride=7, base_dims=(64, 64, 64), depth=(3, 6, 4), heads=(4, 8, 16),
               num_classes=num_classes, **kwargs)
