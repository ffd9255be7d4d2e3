"""PiT, the pooling-based vision transformer ("Rethinking Spatial Dimensions of Vision Transformers", Heo et al.,
ICCV 2021).

An overlapping patch embedding (a ``patch x patch`` convolution with stride ``patch // 2``) plus a learned 2-D
position embedding and a class token, then transformer stages separated by pooling layers. A pooling layer doubles
the channels and halves the token grid with a depthwise (channel multiplier 2) 3x3 stride-2 convolution, and maps the
class token with a Linear layer (lucidrains/vit-pytorch ``vit_pytorch/pit.py`` ``Pool``: ``downsample``,
``cls_ff``). The head is LayerNorm + Linear on the class token.

Backends: on ``eager`` every layer is the plain PyTorch module and attention is matmul-softmax; on the other
backends the pooling convolution runs :func:`vitkern.ops.depthwise_conv2d` (each input channel repeated twice, which
is what a ``groups=C``, ``2C``-output convolution computes) and attention runs SDPA.

Departures from vit-pytorch's ``pit.py``, following the paper and its official code (naver-ai/pit ``pit.py``):
the pooling convolution is the channel-multiplier-2 depthwise convolution alone, without vit-pytorch's extra 1x1
convolution; the transformer blocks use ``dim / heads`` = 32 or 48 or 64 wide heads with qkv biases and MLP ratio 4
(vit-pytorch's ``dim_head=64``/``mlp_dim`` blocks); the position embedding is a (1, C, H, W) map added before the
class token is prepended, so the class token has no position embedding.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vitkern.models._layers import (
    INIT_STD,
    ClassifierModel,
    DepthwiseConvBN,
    block_stack,
    check_image_size,
    check_stage_lengths,
    layer_norm,
    to_map,
    to_pair,
    to_tokens,
    trunc_normal_init,
)
from vitkern.models._registry import _create, register_model


class PiTPool(DepthwiseConvBN):
    """PiT's pooling layer: tokens (B, C, H, W) -> (B, C_out, ceil(H/2), ceil(W/2)) by a grouped 3x3 stride-2
    convolution ``downsample`` (``groups=C``, C_out a multiple of C; the fused :class:`DepthwiseConvBN` without a
    BatchNorm), the class token (B, 1, C) -> (B, 1, C_out) by the Linear ``cls_ff``."""

    def __init__(self, dim: int, dim_out: int, stride: int = 2) -> None:
        if dim_out % dim:
            raise ValueError(f"dim_out: expected a multiple of dim {dim}, got {dim_out}")
        super().__init__(
            dim,
            stride + 1,
            stride,
            stride // 2,
            norm=False,
            multiplier=dim_out // dim,
            names=("downsample", "act", "norm"),
        )
        self.cls_ff = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor, cls_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(x), self.cls_ff(cls_token)


class PiTStage(nn.Module):
    """One PiT stage: the class token and the flattened (B, C, H, W) tokens through ``depth`` blocks."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.blocks = block_stack(depth, 0.0, dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=layer_norm)

    def forward(self, x: torch.Tensor, cls_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.blocks(torch.cat((cls_token, to_tokens(x)), dim=1))
        return to_map(tokens[:, 1:], x.shape[-2:]), tokens[:, :1]


class PiT(ClassifierModel):
    """PiT: (B, in_chans, img_size, img_size) -> (B, num_classes).

    Args:
        img_size: the input side; the position embedding is sized for it, another size raises ValueError.
        patch_size, stride: the patch embedding's kernel and stride (the paper: 16 and 8, or 14 and 7 for PiT-B).
        head_dim: the head width of each stage (timm's ``base_dims``); stage i has ``head_dim[i] * num_heads[i]``
            channels.
        depth: blocks per stage. num_heads: attention heads per stage.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        stride: int = 8,
        head_dim: tuple[int, ...] = (48, 48, 48),
        depth: tuple[int, ...] = (2, 6, 4),
        num_heads: tuple[int, ...] = (2, 4, 8),
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        check_stage_lengths("head_dim, depth, num_heads", head_dim, depth, num_heads)
        self.img_size = to_pair("img_size", img_size)
        grid_h = (self.img_size[0] - patch_size) // stride + 1
        grid_w = (self.img_size[1] - patch_size) // stride + 1
        if grid_h < 1 or grid_w < 1:
            raise ValueError(f"img_size: expected at least patch_size {patch_size}, got {img_size}")
        dims = [d * h for d, h in zip(head_dim, num_heads)]
        self.num_features = dims[-1]
        self.to_patch_embedding = nn.Conv2d(in_chans, dims[0], patch_size, stride)
        self.pos_embedding = nn.Parameter(torch.zeros(1, dims[0], grid_h, grid_w))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dims[0]))
        self.transformers = nn.ModuleList([PiTStage(dim, d, h, mlp_ratio) for dim, d, h in zip(dims, depth, num_heads)])
        self.pools = nn.ModuleList([PiTPool(dims[i], dims[i + 1]) for i in range(len(dims) - 1)])
        self.norm = layer_norm(dims[-1])
        self.reset_classifier(num_classes)
        nn.init.trunc_normal_(self.pos_embedding, std=INIT_STD)
        nn.init.trunc_normal_(self.cls_token, std=INIT_STD)
        self.apply(trunc_normal_init)

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


def _pit(
    patch_size: int, stride: int, head_dim: int, depth: tuple[int, ...], num_heads: tuple[int, ...], overrides: dict
) -> PiT:
    config = dict(patch_size=patch_size, stride=stride, head_dim=(head_dim,) * 3, depth=depth, num_heads=num_heads)
    return _create(PiT, config, overrides)


@register_model
def pit_ti_224(**kwargs) -> PiT:
    """PiT-Ti (4.9 M parameters)."""
    return _pit(16, 8, 32, (2, 6, 4), (2, 4, 8), kwargs)


@register_model
def pit_xs_224(**kwargs) -> PiT:
    """PiT-XS (10.6 M parameters)."""
    return _pit(16, 8, 48, (2, 6, 4), (2, 4, 8), kwargs)


@register_model
def pit_s_224(**kwargs) -> PiT:
    """PiT-S (23.5 M parameters)."""
    return _pit(16, 8, 48, (2, 6, 4), (3, 6, 12), kwargs)


@register_model
def pit_b_224(**kwargs) -> PiT:
    """PiT-B (73.8 M parameters)."""
    return _pit(14, 7, 64, (3, 6, 4), (4, 8, 16), kwargs)
