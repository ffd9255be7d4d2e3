"""LeViT ("LeViT: a Vision Transformer in ConvNet's Clothing for Faster Inference", Graham et al., ICCV 2021).

A four-layer convolutional stem (16x downsampling), three stages of attention + MLP blocks on the (B, C, H, W) map
with 1x1 convolutions and BatchNorm in place of Linear and LayerNorm, "shrink" attention blocks between stages
(queries on a stride-2 grid, 4x wider values, followed by a residual MLP), average pooling and BatchNorm + Linear
classifiers (a class head and a distillation head). Every attention adds a learned per-head bias indexed by the
absolute offset between query and key, ``bias[h, i, j] = pos_bias[|dy| * R + |dx|, h]``.

The attention is :class:`vitkern.nn.LeViTAttention`, the conv-form attention of lucidrains/vit-pytorch
(``vit_pytorch/levit.py``: ``to_q``/``to_k``/``to_v`` 1x1 conv + BatchNorm, ``to_out``, ``pos_bias`` an
``nn.Embedding(R * R, heads)``), which is also timm's ``levit_conv_*`` layout; it adds ``bias / scale`` to the
scaled logits as vit-pytorch does. The classifiers are ``head`` and ``head_dist`` as in timm's ``levit.py``.

Backends: on ``eager`` every layer is the plain PyTorch module and attention is the reference (matmul + gathered
bias + softmax); on the other backends both attentions run :func:`vitkern.ops.levit_attention` (shrink attention
with ``stride=2``), reading the bias table through a transposed view of ``pos_bias.weight``, without a
(B, heads, Nq, Nk) tensor.

Departures from vit-pytorch's ``levit.py``, following the paper (Sec. 4, Table 2) and its official code
(facebookresearch/LeViT ``levit.py``): Hardswish activations (vit-pytorch uses GELU), and a stem of four 3x3
stride-2 conv + BatchNorm layers with Hardswish between them and widths C/8, C/4, C/2, C (vit-pytorch's stem is
four bare convolutions 32, 64, 128, C wide); key width D (16 for LeViT-128S/128, 32 otherwise), value width 2D
(4D in shrink attention, which has in_dim / D heads); MLPs are 1x1 conv + BatchNorm pairs expanding 2x, and every
shrink attention is followed by a residual MLP; the shrink attention's output BatchNorm starts at weight 1 (it has
no residual, so vit-pytorch's zero start would cut the signal); the classifiers are BatchNorm + Linear, and the
distillation head (included in the paper's parameter counts) is averaged with the class head except in
distillation training, which returns both.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vitkern.models._layers import ClassifierModel, check_image_size, check_stage_lengths, make_head, to_pair
from vitkern.models._registry import _create, register_model
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


class LeViTMlp(nn.Module):
    """MLP on (B, dim, H, W): 1x1 ConvNorm expanding ``mlp_ratio``x, Hardswish, 1x1 ConvNorm back."""

    def __init__(self, dim: int, mlp_ratio: int) -> None:
        super().__init__()
        hidden = dim * mlp_ratio
        self.net = nn.Sequential(ConvNorm(dim, hidden), nn.Hardswish(), ConvNorm(hidden, dim, bn_weight_init=0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeViTStage(nn.Module):
    """``depth`` blocks of attention (residual unless it changes the shape) and a residual MLP, on (B, dim, R, R)."""

    def __init__(
        self,
        dim: int,
        fmap_size: int,
        depth: int,
        num_heads: int,
        key_dim: int,
        value_dim: int,
        mlp_ratio: int = MLP_RATIO,
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
                        self._attention(dim, fmap_size, num_heads, key_dim, value_dim, dim_out, downsample),
                        LeViTMlp(dim_out, mlp_ratio),
                    ]
                )
                for _ in range(depth)
            ]
        )

    @staticmethod
    def _attention(
        dim: int, fmap_size: int, num_heads: int, key_dim: int, value_dim: int, dim_out: int, downsample: bool
    ) -> LeViTAttention:
        attn = LeViTAttention(
            dim,
            fmap_size,
            num_heads,
            key_dim,
            value_dim,
            dim_out=dim_out,
            downsample=downsample,
            act_layer=nn.Hardswish,
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


class LeViT(ClassifierModel):
    """LeViT: (B, in_chans, img_size, img_size) -> (B, num_classes).

    Args:
        img_size: the input side; the bias tables are sized for img_size / 16, another size raises ValueError.
        embed_dim, depth, num_heads: per stage. key_dim: D, the key width (values are 2D wide, 4D in shrink
            attention).
        distilled: add the distillation head ``head_dist``; ``distilled_training = True`` makes the training
            forward return (class logits, distillation logits), otherwise the two heads are averaged.
    """

    def __init__(
        self,
        img_size: int = 224,
        embed_dim: tuple[int, ...] = (128, 256, 384),
        depth: tuple[int, ...] = (2, 3, 4),
        num_heads: tuple[int, ...] = (4, 6, 8),
        key_dim: int = 16,
        mlp_ratio: int = MLP_RATIO,
        in_chans: int = 3,
        num_classes: int = 1000,
        distilled: bool = True,
    ) -> None:
        super().__init__()
        check_stage_lengths("embed_dim, depth, num_heads", embed_dim, depth, num_heads)
        self.img_size = to_pair("img_size", img_size)
        if self.img_size[0] != self.img_size[1] or self.img_size[0] % STEM_STRIDE:
            raise ValueError(f"img_size: expected a square size divisible by {STEM_STRIDE}, got {img_size}")
        self.num_features = embed_dim[-1]
        self.distilled = distilled
        c = embed_dim[0]
        self.conv_embedding = nn.Sequential(
            ConvNorm(in_chans, c // 8, 3, 2, 1),
            nn.Hardswish(),
            ConvNorm(c // 8, c // 4, 3, 2, 1),
            nn.Hardswish(),
            ConvNorm(c // 4, c // 2, 3, 2, 1),
            nn.Hardswish(),
            ConvNorm(c // 2, c, 3, 2, 1),
        )
        fmap_size = self.img_size[0] // STEM_STRIDE
        layers = []
        for i, (dim, stage_depth, heads) in enumerate(zip(embed_dim, depth, num_heads)):
            if i > 0:
                prev = embed_dim[i - 1]
                layers.append(
                    LeViTStage(
                        prev,
                        fmap_size,
                        1,
                        prev // key_dim,
                        key_dim,
                        SHRINK_ATTN_RATIO * key_dim,
                        mlp_ratio,
                        dim_out=dim,
                        downsample=True,
                    )
                )
                fmap_size = (fmap_size - 1) // 2 + 1
            layers.append(LeViTStage(dim, fmap_size, stage_depth, heads, key_dim, ATTN_RATIO * key_dim, mlp_ratio))
        self.backbone = nn.Sequential(*layers)
        self.reset_classifier(num_classes)

    def new_head(self, num_classes: int) -> nn.Module:
        """BatchNorm1d + Linear."""
        return make_head(self.num_features, num_classes, NormLinear)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, embed_dim[-1], R, R): R = H / 16, halved (rounded up) by each shrink
        attention."""
        check_image_size(x, self.img_size)
        return self.backbone(self.conv_embedding(x))

    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> the average (B, C), which both heads read."""
        return x.mean(dim=(2, 3))


def _levit(
    embed_dim: tuple[int, ...], depth: tuple[int, ...], num_heads: tuple[int, ...], key_dim: int, overrides: dict
) -> LeViT:
    return _create(LeViT, dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads, key_dim=key_dim), overrides)


@register_model
def levit_128s(**kwargs) -> LeViT:
    """LeViT-128S (7.8 M parameters)."""
    return _levit((128, 256, 384), (2, 3, 4), (4, 6, 8), 16, kwargs)


@register_model
def levit_128(**kwargs) -> LeViT:
    """LeViT-128 (9.2 M parameters)."""
    return _levit((128, 256, 384), (4, 4, 4), (4, 8, 12), 16, kwargs)


@register_model
def levit_192(**kwargs) -> LeViT:
    """LeViT-192 (11.0 M parameters)."""
    return _levit((192, 288, 384), (4, 4, 4), (3, 5, 6), 32, kwargs)


@register_model
def levit_256(**kwargs) -> LeViT:
    """LeViT-256 (18.9 M parameters)."""
    return _levit((256, 384, 512), (4, 4, 4), (4, 6, 8), 32, kwargs)


@register_model
def levit_384(**kwargs) -> LeViT:
    """LeViT-384 (39.1 M parameters)."""
    return _levit((384, 512, 768), (4, 4, 4), (6, 9, 12), 32, kwargs)
