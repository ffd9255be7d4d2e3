"""CoAtNet ("CoAtNet: Marrying Convolution and Attention for All Data Sizes", Dai et al., NeurIPS 2021).

The C-C-T-T layout: a two-layer convolutional stem (S0), two MBConv stages (S1, S2) and two transformer stages with
relative attention (S3, S4), each stage halving the resolution in its first block, then global average pooling and
the classifier. Module and parameter names follow the seed code (``shared/seeds/coatnet_*.txt``): ``s0``..``s4``,
``MBConv`` (``pool``, ``proj``, ``block.expand_conv``/``dw_conv``/``se``/``pro_conv``), ``Transformer``
(``pool1``, ``pool2``, ``proj``, ``attn``, ``ffn``, ``norm1``, ``norm2``), the attention
(:class:`vitkern.nn.RelPosAttention`: ``relative_bias_table``, ``to_qkv``, ``to_out``) and ``fc``.

Backends: on ``eager`` every layer is the plain PyTorch module and the relative attention is the reference
(matmul + gathered bias + softmax). On the other backends the relative attention runs
:func:`vitkern.ops.rel_pos_attention` (the bias gathered from the table inside the kernel, no (B, heads, N, N)
tensor), and the MBConv depthwise 3x3 convolutions run :func:`vitkern.ops.depthwise_conv2d` (in eval mode with the
BatchNorm folded into the weights and bias and the GELU fused).

Departures from the seed, following the paper (Sec. 3, Table 3 and Appendix A.1): attention heads are 32 wide, so a
stage of D channels has D / 32 heads (the seed fixes 8 heads of 32, a 256-wide attention in every stage, which is
why its coatnet_0 has 17.8 M parameters instead of 25 M); the transformer FFN expands the block's output width 4x
(the seed expands its input width); MBConv and transformer blocks are pre-norm (BatchNorm and LayerNorm,
``x + f(norm(x))``), the downsampling transformer pools after the norm (``Proj(Pool(x)) + Attn(Pool(Norm(x)))``);
coatnet_2's last stage has 1024 channels (the seed's 1026 is a typo). The named configurations add a pre-logits
layer before the classifier (LayerNorm, Linear D4 x D4, tanh; ``head_hidden_size``, as timm's paper-style CoAtNet
configurations do): with it every configuration lands within 1.1 % of the paper's parameter count, without it they
fall 1-3.3 % short (coatnet_0: 24.2 M against 25 M). Kept from the seed: the MBConv expands its input width 4x, the
SE layer is a quarter of the input width, the shortcut of a downsampling block is max-pool + 1x1 conv.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitkern._backend import current_backend
from vitkern.models import register_model
from vitkern.models._layers import Mlp, bn_uses_batch_stats, check_image_size, fold_batchnorm, to_pair
from vitkern.nn.attention import RelPosAttention
from vitkern.ops.depthwise_conv import depthwise_conv2d

HEAD_DIM = 32
EXPANSION = 4
SE_RATIO = 0.25


def conv_3x3_bn(in_c: int, out_c: int, downsample: bool = False) -> nn.Sequential:
    """Stem layer: 3x3 conv (stride 2 when ``downsample``), BatchNorm, GELU."""
    return nn.Sequential(
        nn.Conv2d(in_c, out_c, 3, 2 if downsample else 1, 1, bias=False), nn.BatchNorm2d(out_c), nn.GELU()
    )


class SE(nn.Module):
    """Squeeze-excitation on (B, C, H, W): channel gates from the pooled input, ``int(in_c * expansion)`` wide."""

    def __init__(self, in_c: int, out_c: int, expansion: float = SE_RATIO) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        hidden = int(in_c * expansion)
        self.fc = nn.Sequential(
            nn.Linear(out_c, hidden, bias=False), nn.GELU(), nn.Linear(hidden, out_c, bias=False), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        return x * self.fc(self.avg_pool(x).view(b, c)).view(b, c, 1, 1)


class DepthwiseConvBN(nn.Sequential):
    """Depthwise 3x3 conv (no bias), BatchNorm, GELU on (B, C, H, W), the seed's ``dw_conv``; fused into one
    :func:`vitkern.ops.depthwise_conv2d` call on the non-eager backends."""

    def __init__(self, channels: int) -> None:
        super().__init__(
            nn.Conv2d(channels, channels, 3, 1, 1, groups=channels, bias=False), nn.BatchNorm2d(channels), nn.GELU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self[0], self[1]
        if current_backend() == "eager":
            return super().forward(x)
        weight = conv.weight.to(x.dtype)
        if bn_uses_batch_stats(bn):
            return F.gelu(bn(depthwise_conv2d(x, weight, None, padding=1)))
        scale, shift = fold_batchnorm(bn)
        folded = (conv.weight * scale.view(-1, 1, 1, 1)).to(x.dtype)
        return depthwise_conv2d(x, folded, shift.to(x.dtype), padding=1, activation="gelu")


class MBConv(nn.Module):
    """Pre-norm MBConv on (B, in_c, H, W) -> (B, out_c, H', W'): ``x + block(BN(x))``, or with ``downsample``
    (H' = ceil(H / 2)) ``proj(pool(x)) + block(BN(x))`` with the stride in the expanding 1x1 conv."""

    def __init__(self, in_c: int, out_c: int, downsample: bool = False, expansion: int = EXPANSION) -> None:
        super().__init__()
        self.downsample = downsample
        hidden_dim = int(in_c * expansion)
        if downsample:
            self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            self.proj = nn.Conv2d(in_c, out_c, 1, 1, 0, bias=False)
        self.norm = nn.BatchNorm2d(in_c)
        self.block = nn.Sequential()
        self.block.add_module(
            "expand_conv",
            nn.Sequential(
                nn.Conv2d(in_c, hidden_dim, 1, 2 if downsample else 1, 0, bias=False),
                nn.BatchNorm2d(hidden_dim),
                nn.GELU(),
            ),
        )
        self.block.add_module("dw_conv", DepthwiseConvBN(hidden_dim))
        self.block.add_module("se", SE(in_c, hidden_dim))
        self.block.add_module(
            "pro_conv", nn.Sequential(nn.Conv2d(hidden_dim, out_c, 1, 1, 0, bias=False), nn.BatchNorm2d(out_c))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.proj(self.pool(x)) if self.downsample else x
        return shortcut + self.block(self.norm(x))


class Transformer(nn.Module):
    """Pre-norm transformer block with relative attention on (B, in_c, H, W) -> (B, out_c, ih, iw):
    ``x + attn(LN(x))``, or with ``downsample`` ``proj(pool2(x)) + attn(pool1(LN(x)))``; then ``x + ffn(LN(x))``."""

    def __init__(
        self, in_c: int, out_c: int, image_size: tuple[int, int], downsample: bool = False, expansion: int = EXPANSION
    ) -> None:
        super().__init__()
        self.downsample = downsample
        self.ih, self.iw = image_size
        if downsample:
            self.pool1 = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            self.pool2 = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            self.proj = nn.Conv2d(in_c, out_c, 1, 1, 0, bias=False)
        self.norm1 = nn.LayerNorm(in_c)
        self.attn = RelPosAttention(in_c, out_c, image_size, heads=out_c // HEAD_DIM, dim_head=HEAD_DIM)
        self.norm2 = nn.LayerNorm(out_c)
        self.ffn = Mlp(out_c, out_c * expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.proj(self.pool2(x)) if self.downsample else x
        h = self.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if self.downsample:
            h = self.pool1(h)
        h = self.attn(h.flatten(2).transpose(1, 2))
        x = shortcut + h.transpose(1, 2).reshape(shortcut.shape)
        tokens = x.flatten(2).transpose(1, 2)
        return x + self.ffn(self.norm2(tokens)).transpose(1, 2).reshape(x.shape)


class CoAtNet(nn.Module):
    """CoAtNet: (B, in_channels, *image_size) -> (B, num_classes).

    Args:
        image_size: the input size (an int or (H, W)); the relative-position tables are sized for it, another size
            raises ValueError. (``img_size`` is accepted as an alias, as ``create_model`` passes it.)
        num_blocks: L, blocks of S0..S4. channels: D, channels of S0..S4.
        block_types: "C" (MBConv) or "T" (transformer) for S1..S4.
        head_hidden_size: width of the pre-logits layer (LayerNorm, Linear, tanh), None for none.
    """

    def __init__(
        self,
        image_size: int | tuple[int, int] = 224,
        in_channels: int = 3,
        num_blocks: tuple[int, ...] = (2, 2, 3, 5, 2),
        channels: tuple[int, ...] = (64, 96, 192, 384, 768),
        num_classes: int = 1000,
        block_types: tuple[str, ...] = ("C", "C", "T", "T"),
        head_hidden_size: int | None = None,
        img_size: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if len(num_blocks) != 5 or len(channels) != 5:
            raise ValueError(
                f"num_blocks, channels: expected 5 entries each (S0..S4), got {len(num_blocks)} and {len(channels)}"
            )
        if min(num_blocks) < 1:
            raise ValueError(f"num_blocks: expected at least 1 block per stage, got {tuple(num_blocks)}")
        if len(block_types) != 4 or not set(block_types) <= {"C", "T"}:
            raise ValueError(f"block_types: expected 4 entries of 'C' or 'T', got {block_types!r}")
        for kind, dim in zip(block_types, channels[1:]):
            if kind == "T" and dim % HEAD_DIM:
                raise ValueError(f"channels: transformer stages need multiples of {HEAD_DIM}, got {dim}")
        self.image_size = to_pair("image_size", img_size if img_size is not None else image_size)
        self.num_classes = num_classes
        self.num_features = channels[-1]
        sizes = [self.image_size]
        for _ in range(5):
            sizes.append((math.ceil(sizes[-1][0] / 2), math.ceil(sizes[-1][1] / 2)))
        self.s0 = nn.Sequential(
            *[
                conv_3x3_bn(in_channels if i == 0 else channels[0], channels[0], downsample=i == 0)
                for i in range(num_blocks[0])
            ]
        )
        for stage, kind in enumerate(block_types, start=1):
            blocks = []
            for i in range(num_blocks[stage]):
                in_c = channels[stage - 1] if i == 0 else channels[stage]
                if kind == "C":
                    blocks.append(MBConv(in_c, channels[stage], downsample=i == 0))
                else:
                    blocks.append(Transformer(in_c, channels[stage], sizes[stage + 1], downsample=i == 0))
            setattr(self, f"s{stage}", nn.Sequential(*blocks))
        self.head_hidden_size = head_hidden_size
        if head_hidden_size is None:
            self.norm = nn.Identity()
            self.pre_logits = nn.Identity()
            head_in = channels[-1]
        else:
            self.norm = nn.LayerNorm(channels[-1])
            self.pre_logits = nn.Sequential(nn.Linear(channels[-1], head_hidden_size), nn.Tanh())
            head_in = head_hidden_size
        self.fc = nn.Linear(head_in, num_classes, bias=False) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a fresh one for ``num_classes`` (0: no classifier, features out)."""
        self.num_classes = num_classes
        head_in = self.head_hidden_size or self.num_features
        self.fc = nn.Linear(head_in, num_classes, bias=False) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, channels[4], H / 32, W / 32)."""
        check_image_size(x, self.image_size)
        return self.s4(self.s3(self.s2(self.s1(self.s0(x)))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C, h, w) -> (B, num_classes), or the pre-logits features with ``pre_logits``."""
        x = self.pre_logits(self.norm(x.mean(dim=(2, 3))))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _coatnet(num_blocks, channels, num_classes: int, **kwargs) -> CoAtNet:
    kwargs.setdefault("head_hidden_size", channels[-1])
    return CoAtNet(num_blocks=num_blocks, channels=channels, num_classes=num_classes, **kwargs)


@register_model
def coatnet_0(num_classes: int = 1000, **kwargs) -> CoAtNet:
    """CoAtNet-0 (25 M parameters)."""
    return _coatnet((2, 2, 3, 5, 2), (64, 96, 192, 384, 768), num_classes, **kwargs)


@register_model
def coatnet_1(num_classes: int = 1000, **kwargs) -> CoAtNet:
    """CoAtNet-1 (42 M parameters)."""
    return _coatnet((2, 2, 6, 14, 2), (64, 96, 192, 384, 768), num_classes, **kwargs)


@register_model
def coatnet_2(num_classes: int = 1000, **kwargs) -> CoAtNet:
    """CoAtNet-2 (75 M parameters)."""
    return _coatnet((2, 2, 6, 14, 2), (128, 128, 256, 512, 1024), num_classes, **kwargs)


@register_model
def coatnet_3(num_classes: int = 1000, **kwargs) -> CoAtNet:
    """CoAtNet-3 (168 M parameters)."""
    return _coatnet((2, 2, 6, 14, 2), (192, 192, 384, 768, 1536), num_classes, **kwargs)


@register_model
def coatnet_4(num_classes: int = 1000, **kwargs) -> CoAtNet:
    """CoAtNet-4 (275 M parameters)."""
    return _coatnet((2, 2, 12, 28, 2), (192, 192, 384, 768, 1536), num_classes, **kwargs)
