"""ConvMixer ("Patches Are All You Need?", Trockman & Kolter, ICLR 2022).

A patch embedding (a ``p x p`` convolution with stride ``p``, activation, BatchNorm) followed by ``depth`` blocks of
a residual depthwise ``k x k`` convolution (conv, activation, BatchNorm, + x) and a pointwise convolution (conv,
activation, BatchNorm), then global average pooling and a linear classifier, as in the seed code
(``shared/seeds/convmixer_*.txt``). Parameter names follow the annotated implementation there.

Backends: on ``eager`` every layer is the plain PyTorch module. On the other backends the depthwise block runs
:func:`vitkern.ops.depthwise_conv2d`: in eval mode as one fused call, the BatchNorm folded into the epilogue's
per-channel scale and shift and the residual added in the same pass; in train mode (BatchNorm needs the batch
statistics) the conv and activation are fused and BatchNorm and the residual follow.

Departure from the seed: ``convmixer_768_32`` uses ReLU, as the paper's ConvMixer-768/32 does (Table 1; also
timm's ``convmixer_768_32``); the other configurations use GELU.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vitkern._backend import current_backend
from vitkern.models import register_model
from vitkern.models._layers import ClassifierModel, depthwise_act_bn, make_head

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class PatchEmbeddings(nn.Module):
    """(B, in_chans, H, W) -> (B, dim, H / p, W / p): conv p x p stride p, activation, BatchNorm."""

    def __init__(self, dim: int, patch_size: int, in_chans: int = 3, activation: str = "gelu") -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.act = ACTIVATIONS[activation]()
        self.norm = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.conv(x)))


class ConvMixerLayer(nn.Module):
    """One ConvMixer block on (B, dim, H, W): ``x = x + BN(act(dwconv(x)))``, then ``BN(act(pwconv(x)))``."""

    def __init__(self, dim: int, kernel_size: int, activation: str = "gelu") -> None:
        super().__init__()
        self.activation = activation
        self.depth_wise_conv = nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same")
        self.act1 = ACTIVATIONS[activation]()
        self.norm1 = nn.BatchNorm2d(dim)
        self.point_wise_conv = nn.Conv2d(dim, dim, kernel_size=1)
        self.act2 = ACTIVATIONS[activation]()
        self.norm2 = nn.BatchNorm2d(dim)

    def spatial_mixing(self, x: torch.Tensor) -> torch.Tensor:
        """``x + BN(act(dwconv(x)))``, on the fused op unless the backend is ``eager``."""
        if current_backend() == "eager":
            return x + self.norm1(self.act1(self.depth_wise_conv(x)))
        return depthwise_act_bn(x, self.depth_wise_conv, self.norm1, self.activation, residual=x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.spatial_mixing(x)
        return self.norm2(self.act2(self.point_wise_conv(x)))


class ConvMixer(ClassifierModel):
    """ConvMixer-h/d: (B, in_chans, H, W) -> (B, num_classes).

    Args:
        dim: h, the channels of the patch embedding and of every block.
        depth: d, the number of blocks.
        kernel_size: k of the depthwise convolution.
        patch_size: p, the side and stride of the patch embedding.
        activation: "gelu" or "relu".
        img_size: accepted for ``create_model``; any input size divisible into patches works.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        kernel_size: int = 9,
        patch_size: int = 7,
        in_chans: int = 3,
        num_classes: int = 1000,
        activation: str = "gelu",
        img_size: int = 224,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {tuple(ACTIVATIONS)}, got {activation!r}")
        self.num_classes = num_classes
        self.num_features = dim
        self.img_size = img_size
        self.patch_emb = PatchEmbeddings(dim, patch_size, in_chans, activation)
        self.blocks = nn.Sequential(*[ConvMixerLayer(dim, kernel_size, activation) for _ in range(depth)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = make_head(dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, dim, H / p, W / p)."""
        return self.blocks(self.patch_emb(x))

    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, dim, h, w) -> the average (B, dim)."""
        return self.pool(x).flatten(1)


@register_model
def convmixer_1536_20(num_classes: int = 1000, **kwargs) -> ConvMixer:
    """ConvMixer-1536/20, kernel 9, patch 7 (51.6 M parameters)."""
    return ConvMixer(1536, 20, kernel_size=9, patch_size=7, num_classes=num_classes, **kwargs)


@register_model
def convmixer_768_32(num_classes: int = 1000, **kwargs) -> ConvMixer:
    """ConvMixer-768/32, kernel 7, patch 7, ReLU as in the paper (21.1 M parameters)."""
    kwargs.setdefault("activation", "relu")
    return ConvMixer(768, 32, kernel_size=7, patch_size=7, num_classes=num_classes, **kwargs)


@register_model
def convmixer_1024_20_ks9_p14(num_classes: int = 1000, **kwargs) -> ConvMixer:
    """ConvMixer-1024/20, kernel 9, patch 14 (24.4 M parameters)."""
    return ConvMixer(1024, 20, kernel_size=9, patch_size=14, num_classes=num_classes, **kwargs)
