"""CoAtNet ("CoAtNet: Marrying Convolution and Attention for All Data Sizes", Dai et al., NeurIPS 2021).

The C-C-T-T layout: a two-layer convolutional stem (S0), two MBConv stages (S1, S2) and two transformer stages with
relative attention (S3, S4), each stage halving the resolution in its first block, then global average pooling and
the classifier. The layout and module names follow chinhsuanwu/coatnet-pytorch (``coatnet.py``): ``s0``..``s4``,
``conv_3x3_bn``, ``MBConv`` (``pool``, ``proj``, ``block``: ``expand_conv``, ``dw_conv``, ``se``, ``pro_conv``),
:class:`CoAtNetTransformer` (``pool1``, ``pool2``, ``proj``, ``attn``, ``ffn``, ``norm1``, ``norm2``), the attention
(:class:`vitkern.nn.RelPosAttention`: ``relative_bias_table``, ``to_qkv``, ``to_out``); the classifier is ``head``
(state_dicts saved with its former name ``fc`` still load).

Backends: on ``eager`` every layer is the plain PyTorch module and the relative attention is the reference
(matmul + gathered bias + softmax). On the other backends the relative attention runs
:func:`vitkern.ops.rel_pos_attention` (the bias gathered from the table inside the kernel, no (B, heads, N, N)
tensor), and the MBConv depthwise 3x3 convolutions run :func:`vitkern.ops.depthwise_conv2d` (in eval mode with the
BatchNorm folded into the weights and bias and the GELU fused).

Departures from chinhsuanwu/coatnet-pytorch, following the paper (Sec. 3, Table 3 and Appendix A.1): attention
heads are 32 wide, so a stage of D channels has D / 32 heads (that code fixes 8 heads of 32, a 256-wide attention in
every stage, which is why its coatnet_0 has 17.8 M parameters instead of 25 M); the transformer FFN expands the
block's output width 4x (that code expands its input width); MBConv and transformer blocks are pre-norm (BatchNorm
and LayerNorm, ``x + f(norm(x))``), the downsampling transformer pools after the norm
(``Proj(Pool(x)) + Attn(Pool(Norm(x)))``); coatnet_2's last stage has 1024 channels (that code's 1026 is a typo).
The named configurations add a pre-logits layer before the classifier (LayerNorm, Linear D4 x D4, tanh;
``head_hidden_size``, as timm's paper-style CoAtNet configurations in ``timm/models/maxxvit.py`` do): with it every
configuration lands within 1.1 % of the paper's parameter count, without it they fall 1-3.3 % short (coatnet_0:
24.2 M against 25 M). Kept from that code: the MBConv expands its input width 4x, the SE layer is a quarter of the
input width, the shortcut of a downsampling block is max-pool + 1x1 conv.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
from einops import rearrange

from vitkern.models._layers import (
    ClassifierModel,
    DepthwiseConvBN,
    Mlp,
    check_image_size,
    make_head,
    to_map,
    to_pair,
    to_tokens,
)
from vitkern.models._registry import _create, register_model
from vitkern.nn.attention import RelPosAttention

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
        self.block.add_module(
            "dw_conv",
            DepthwiseConvBN(
                hidden_dim, 3, 1, 1, bias=False, activation="gelu", act_after_norm=True, names=("0", "2", "1")
            ),
        )
        self.block.add_module("se", SE(in_c, hidden_dim))
        self.block.add_module(
            "pro_conv", nn.Sequential(nn.Conv2d(hidden_dim, out_c, 1, 1, 0, bias=False), nn.BatchNorm2d(out_c))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.proj(self.pool(x)) if self.downsample else x
        return shortcut + self.block(self.norm(x))


class CoAtNetTransformer(nn.Module):
    """Pre-norm transformer block with relative attention on (B, in_c, H, W) -> (B, out_c, ih, iw):
    ``x + attn(LN(x))``, or with ``downsample`` ``proj(pool2(x)) + attn(pool1(LN(x)))``; then ``x + ffn(LN(x))``."""

    def __init__(
        self, in_c: int, out_c: int, img_size: tuple[int, int], downsample: bool = False, expansion: int = EXPANSION
    ) -> None:
        super().__init__()
        self.downsample = downsample
        self.ih, self.iw = img_size
        if downsample:
            self.pool1 = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            self.pool2 = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            self.proj = nn.Conv2d(in_c, out_c, 1, 1, 0, bias=False)
        self.norm1 = nn.LayerNorm(in_c)
        self.attn = RelPosAttention(in_c, out_c, img_size, num_heads=out_c // HEAD_DIM, head_dim=HEAD_DIM)
        self.norm2 = nn.LayerNorm(out_c)
        self.ffn = Mlp(out_c, out_c * expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.proj(self.pool2(x)) if self.downsample else x
        h = rearrange(self.norm1(rearrange(x, "b c h w -> b h w c")), "b h w c -> b c h w")
        if self.downsample:
            h = self.pool1(h)
        x = shortcut + to_map(self.attn(to_tokens(h)), shortcut.shape[-2:])
        return x + to_map(self.ffn(self.norm2(to_tokens(x))), x.shape[-2:])


class CoAtNet(ClassifierModel):
    """CoAtNet: (B, in_chans, *img_size) -> (B, num_classes).

    Args:
        img_size: the input size (an int or (H, W)); the relative-position tables are sized for it, another size
            raises ValueError.
        depth: L, blocks of S0..S4. embed_dim: D, channels of S0..S4.
        block_types: "C" (MBConv) or "T" (transformer) for S1..S4.
        head_hidden_size: width of the pre-logits layer (LayerNorm, Linear, tanh), None for none.
    """

    legacy_head_names = {"fc": "head"}

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        depth: tuple[int, ...] = (2, 2, 3, 5, 2),
        embed_dim: tuple[int, ...] = (64, 96, 192, 384, 768),
        num_classes: int = 1000,
        block_types: tuple[str, ...] = ("C", "C", "T", "T"),
        head_hidden_size: int | None = None,
    ) -> None:
        super().__init__()
        if len(depth) != 5 or len(embed_dim) != 5:
            raise ValueError(
                f"depth, embed_dim: expected 5 entries each (S0..S4), got {len(depth)} and {len(embed_dim)}"
            )
        if min(depth) < 1:
            raise ValueError(f"depth: expected at least 1 block per stage, got {tuple(depth)}")
        if len(block_types) != 4 or not set(block_types) <= {"C", "T"}:
            raise ValueError(f"block_types: expected 4 entries of 'C' or 'T', got {block_types!r}")
        for kind, dim in zip(block_types, embed_dim[1:]):
            if kind == "T" and dim % HEAD_DIM:
                raise ValueError(f"embed_dim: transformer stages need multiples of {HEAD_DIM}, got {dim}")
        self.img_size = to_pair("img_size", img_size)
        self.num_features = embed_dim[-1]
        sizes = [self.img_size]
        for _ in range(5):
            sizes.append((math.ceil(sizes[-1][0] / 2), math.ceil(sizes[-1][1] / 2)))
        self.s0 = nn.Sequential(
            *[
                conv_3x3_bn(in_chans if i == 0 else embed_dim[0], embed_dim[0], downsample=i == 0)
                for i in range(depth[0])
            ]
        )
        for stage, kind in enumerate(block_types, start=1):
            blocks = []
            for i in range(depth[stage]):
                in_c = embed_dim[stage - 1] if i == 0 else embed_dim[stage]
                if kind == "C":
                    blocks.append(MBConv(in_c, embed_dim[stage], downsample=i == 0))
                else:
                    blocks.append(CoAtNetTransformer(in_c, embed_dim[stage], sizes[stage + 1], downsample=i == 0))
            setattr(self, f"s{stage}", nn.Sequential(*blocks))
        self.head_hidden_size = head_hidden_size
        if head_hidden_size is None:
            self.norm = nn.Identity()
            self.pre_logits = nn.Identity()
        else:
            self.norm = nn.LayerNorm(embed_dim[-1])
            self.pre_logits = nn.Sequential(nn.Linear(embed_dim[-1], head_hidden_size), nn.Tanh())
        self.reset_classifier(num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def new_head(self, num_classes: int) -> nn.Module:
        """A Linear without bias on the pre-logits features."""
        return make_head(self.head_hidden_size or self.num_features, num_classes, partial(nn.Linear, bias=False))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, embed_dim[4], H / 32, W / 32)."""
        check_image_size(x, self.img_size)
        return self.s4(self.s3(self.s2(self.s1(self.s0(x)))))

    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> the pre-logits features (B, head_hidden_size or C)."""
        return self.pre_logits(self.norm(x.mean(dim=(2, 3))))


def _coatnet(depth: tuple[int, ...], embed_dim: tuple[int, ...], overrides: dict) -> CoAtNet:
    config = dict(depth=depth, embed_dim=embed_dim, head_hidden_size=embed_dim[-1])
    return _create(CoAtNet, config, overrides)


@register_model
def coatnet_0(**kwargs) -> CoAtNet:
    """CoAtNet-0 (25 M parameters)."""
    return _coatnet((2, 2, 3, 5, 2), (64, 96, 192, 384, 768), kwargs)


@register_model
def coatnet_1(**kwargs) -> CoAtNet:
    """CoAtNet-1 (42 M parameters)."""
    return _coatnet((2, 2, 6, 14, 2), (64, 96, 192, 384, 768), kwargs)


@register_model
def coatnet_2(**kwargs) -> CoAtNet:
    """CoAtNet-2 (75 M parameters)."""
    return _coatnet((2, 2, 6, 14, 2), (128, 128, 256, 512, 1024), kwargs)


@register_model
def coatnet_3(**kwargs) -> CoAtNet:
    """CoAtNet-3 (168 M parameters)."""
    return _coatnet((2, 2, 6, 14, 2), (192, 192, 384, 768, 1536), kwargs)


@register_model
def coatnet_4(**kwargs) -> CoAtNet:
    """CoAtNet-4 (275 M parameters)."""
    return _coatnet((2, 2, 12, 28, 2), (192, 192, 384, 768, 1536), kwargs)
