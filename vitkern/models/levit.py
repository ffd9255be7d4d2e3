"""LeViT ("LeViT: a Vision Transformer in ConvNet's Clothing for Faster Inference", Graham et al., ICCV 2021).

A four-layer convolutional stem (16x downsampling), three stages of attention + MLP blocks on the (B, C, H, W) map
with 1x1 convolutions and BatchNorm in place of Linear and LayerNorm, "shrink" attention blocks between stages
(queries on a stride-2 grid, 4x wider values, followed by a residual MLP), average pooling and BatchNorm + Linear
classifiers (a class head and a distillation head). Every attention adds a learned per-head bias indexed by the
absolute offset between query and key, ``bias[h, i, j] = pos_bias[|dy| * R + |dx|, h]``.

The attention is :class:`vitkern.nn.LeViTAttention`, the seed's conv-form attention with the seed's names
(``shared/seeds/deepvit_..._cvt_article.txt``: ``to_q``/``to_k``/``to_v`` 1x1 conv + BatchNorm, ``to_out``,
``pos_bias`` an ``nn.Embedding(R * R, heads)``), which is also timm's ``levit_conv_*`` layout; it adds
``bias / scale`` to the scaled logits as the seed does.

Backends: on ``eager`` every layer is the plain PyTorch module and attention is the reference (matmul + gathered
bias + softmax); on the other backends both attentions run :func:`vitkern.ops.levit_attention` (shrink attention
with ``stride=2``), reading the bias table through a transposed view of ``pos_bias.weight``, without a
(B, heads, Nq, Nk) tensor.

Departures from the seed, following the paper (Sec. 4, Table 2) and its official code: Hardswish activations
(the seed uses GELU), and a stem of four 3x3 stride-2 conv + BatchNorm layers with Hardswish between them and
widths C/8, C/4, C/2, C (the seed's stem is four bare convolutions 32, 64, 128, C wide); key width D (16 for
LeViT-128S/128, 32 otherwise), value width 2D (4D in shrink attention, which has in_dim / D heads); MLPs are
1x1 conv + BatchNorm pairs expanding 2x, and every shrink attention is followed by a residual MLP; the shrink
attention's output BatchNorm starts at weight 1 (it has no residual, so the seed's zero start would cut the signal);
the classifiers are BatchNorm + Linear, and the distillation head (included in the paper's parameter counts) is
averaged with the class head except in distillation training, which returns both.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vitkern.models import register_model
from vitkern.models._layers import check_image_size, to_pair
from vitkern.nn.attention import LeViTAttention

STEM_STRIDE = 16
ATTN_RATIO = 2
SHRINK_ATTN_RATIO = 4
MLP_RATIO = 2
# Index of the BatchNorm in LeViTAttention.to_out (act, conv, norm, dropout).
OUT_NORM = 2


class ConvNorm(nn.Sequential):
    """Conv (no bias) + BatchNorm: (B, in_c, H, W) -> (B, out_c, H', W'); ``bn_weight_init`` 0 makes a residual
    branch start as the identity."""

    def __init__(
        self, in_c: int, out_c: int, kernel_size: int = 1, stride: int = 1, padding: int = 0, bn_weight_init: float = 1
    ) -> None:
        super().__init__(nn.Conv2d(in_c, out_c, kernel_size, stride, padding, bias=False), nn.BatchNorm2d(out_c))
        nn.init.constant_(self[1].weight, bn_weight_init)


class FeedForward(nn.Module):
    """MLP on (B, dim, H, W): 1x1 ConvNorm expanding ``mult``x, Hardswish, 1x1 ConvNorm back."""

    def __init__(self, dim: int, mult: int) -> None:
        super().__init__()
        self.net = nn.Sequential(ConvNorm(dim, dim * mult), nn.Hardswish(), ConvNorm(dim * mult, dim, bn_weight_init=0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Transformer(nn.Module):
    """``depth`` blocks of attention (residual unless it changes the shape) and a residual MLP, on (B, dim, R, R)."""

    def __init__(
        self,
        dim: int,
        fmap_size: int,
        depth: int,
        heads: int,
        dim_key: int,
        dim_value: int,
        mlp_mult: int = MLP_RATIO,
        dim_out: int | None = None,
        downsample: bool = False,
    ) -> None:
        super().__init__()
        dim_out = dim if dim_out is None else dim_out
        self.attn_residual = not downsample and dim == dim_out
        self.layers = nn.ModuleList(
            [
                nn.ModuleList(
                    [
                        self._attention(dim, fmap_size, heads, dim_key, dim_value, dim_out, downsample),
                        FeedForward(dim_out, mlp_mult),
                    ]
                )
                for _ in range(depth)
            ]
        )

    @staticmethod
    def _attention(
        dim: int, fmap_size: int, heads: int, dim_key: int, dim_value: int, dim_out: int, downsample: bool
    ) -> LeViTAttention:
        attn = LeViTAttention(
            dim, fmap_size, heads, dim_key, dim_value, dim_out=dim_out, downsample=downsample, act_layer=nn.Hardswish
        )
        if downsample:
            nn.init.ones_(attn.to_out[OUT_NORM].weight)
        return attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x if self.attn_residual else attn(x)
            x = ff(x) + x
        return x


class NormLinear(nn.Sequential):
    """BatchNorm1d + Linear classifier: (B, dim) -> (B, num_classes)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__(nn.BatchNorm1d(dim), nn.Linear(dim, num_classes))


class LeViT(nn.Module):
    """LeViT: (B, in_chans, img_size, img_size) -> (B, num_classes).

    Args:
        img_size: the input side; the bias tables are sized for img_size / 16, another size raises ValueError.
        dims, depths, heads: per stage. dim_key: D, the key width (values are 2D wide, 4D in shrink attention).
        distillation: add the distillation head ``head_dist``; ``distilled_training = True`` makes the training
            forward return (class logits, distillation logits), otherwise the two heads are averaged.
    """

    def __init__(
        self,
        img_size: int = 224,
        dims: tuple[int, ...] = (128, 256, 384),
        depths: tuple[int, ...] = (2, 3, 4),
        heads: tuple[int, ...] = (4, 6, 8),
        dim_key: int = 16,
        mlp_mult: int = MLP_RATIO,
        in_chans: int = 3,
        num_classes: int = 1000,
        distillation: bool = True,
    ) -> None:
        super().__init__()
        if not len(dims) == len(depths) == len(heads):
            raise ValueError(
                f"dims, depths, heads: expected one entry per stage each, got {len(dims)}, {len(depths)}, {len(heads)}"
            )
        self.img_size = to_pair("img_size", img_size)
        if self.img_size[0] != self.img_size[1] or self.img_size[0] % STEM_STRIDE:
            raise ValueError(f"img_size: expected a square size divisible by {STEM_STRIDE}, got {img_size}")
        self.num_classes = num_classes
        self.num_features = dims[-1]
        self.distillation = distillation
        self.distilled_training = False
        c = dims[0]
        self.conv_embedding = nn.Sequential(
            ConvNorm(in_chans, c // 8, 3, 2, 1), nn.Hardswish(),
            ConvNorm(c // 8, c // 4, 3, 2, 1), nn.Hardswish(),
            ConvNorm(c // 4, c // 2, 3, 2, 1), nn.Hardswish(),
            ConvNorm(c // 2, c, 3, 2, 1),
        )
        fmap_size = self.img_size[0] // STEM_STRIDE
        layers = []
        for i, (dim, depth, num_heads) in enumerate(zip(dims, depths, heads)):
            if i > 0:
                layers.append(
                    Transformer(
                        dims[i - 1], fmap_size, 1, dims[i - 1] // dim_key, dim_key, SHRINK_ATTN_RATIO * dim_key,
                        mlp_mult, dim_out=dim, downsample=True,
                    )
                )
                fmap_size = (fmap_size - 1) // 2 + 1
            layers.append(Transformer(dim, fmap_size, depth, num_heads, dim_key, ATTN_RATIO * dim_key, mlp_mult))
        self.backbone = nn.Sequential(*layers)
        self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier(s) with fresh ones for ``num_classes`` (0: no classifier, features out)."""
        self.num_classes = num_classes
        self.head = NormLinear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist = (
            NormLinear(self.num_features, num_classes) if num_classes > 0 and self.distillation else None
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, dims[-1], R, R): R = H / 16, halved (rounded up) by each shrink attention."""
        check_image_size(x, self.img_size)
        return self.backbone(self.conv_embedding(x))

    def forward_head(
        self, x: torch.Tensor, pre_logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, C, h, w) -> (B, num_classes); a (class, distillation) pair in distillation training."""
        x = x.mean(dim=(2, 3))
        if pre_logits:
            return x
        if self.head_dist is None:
            return self.head(x)
        out, out_dist = self.head(x), self.head_dist(x)
        if self.distilled_training and self.training:
            return out, out_dist
        return (out + out_dist) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.forward_head(self.forward_features(x))


@register_model
def levit_128s(num_classes: int = 1000, **kwargs) -> LeViT:
    """LeViT-128S (7.8 M parameters)."""
    return LeViT(dims=(128, 256, 384), depths=(2, 3, 4), heads=(4, 6, 8), dim_key=16, num_classes=num_classes,
                 **kwargs)


@register_model
def levit_128(num_classes: int = 1000, **kwargs) -> LeViT:
    """LeViT-128 (9.2 M parameters)."""
    return LeViT(dims=(128, 256, 384), depths=(4, 4, 4), heads=(4, 8, 12), dim_key=16, num_classes=num_classes,
                 **kwargs)


@register_model
def levit_192(num_classes: int = 1000, **kwargs) -> LeViT:
    """LeViT-192 (11.0 M parameters)."""
    return LeViT(dims=(192, 288, 384), depths=(4, 4, 4), heads=(3, 5, 6), dim_key=32, num_classes=num_classes,
                 **kwargs)


@register_model
def levit_256(num_classes: int = 1000, **kwargs) -> LeViT:
    """LeViT-256 (18.9 M parameters)."""
    return LeViT(dims=(256, 384, 512), depths=(4, 4, 4), heads=(4, 6, 8), dim_key=32, num_classes=num_classes,
                 **kwargs)


@register_model
def levit_384(num_classes: int = 1000, **kwargs) -> LeViT:
    """LeViT-384 (39.1 M parameters)."""
    return LeViT(dims=(384, 512, 768), depths=(4, 4, 4), heads=(6, 9, 12), dim_key=32, num_classes=num_classes,
                 **kwargs)
