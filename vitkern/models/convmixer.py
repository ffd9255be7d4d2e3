"""ConvMixer ("Patches Are All You Need?", Trockman & Kolter, ICLR 2022).

A patch embedding (a ``p x p`` convolution with stride ``p``, activation, BatchNorm) followed by ``depth`` blocks of
a residual depthwise ``k x k`` convolution (conv, activation, BatchNorm, + x) and a pointwise convolution (conv,
activation, BatchNorm), then global average pooling and a linear classifier ``head``, as in the paper's code
(locuslab/convmixer ``convmixer.py``). Module names follow labmlai/annotated_deep_learning_paper_implementations
(``labml_nn/conv_mixer/__init__.py``: ``patch_emb``, ``depth_wise_conv``, ``act1``, ``norm1``, ``point_wise_conv``).

Backends: on ``eager`` every layer is the plain PyTorch module. On the other backends the depthwise block runs
:func:`vitkern.ops.depthwise_conv2d` (:class:`vitkern.models._layers.DepthwiseConvBN`): in eval mode as one fused
call, the BatchNorm folded into the epilogue's per-channel scale and shift and the residual added in the same pass;
in train mode (BatchNorm needs the batch statistics) the conv and activation are fused and BatchNorm and the
residual follow.

``convmixer_768_32`` uses ReLU, as the paper's ConvMixer-768/32 does (Table 1; also timm's ``convmixer_768_32``);
the other configurations use GELU.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vitkern.models._layers import ACT_LAYERS, ClassifierModel, DepthwiseConvBN
from vitkern.models._registry import _create, register_model


class ConvMixerStem(nn.Module):
    """(B, in_chans, H, W) -> (B, embed_dim, H / p, W / p): conv p x p stride p, activation, BatchNorm."""

    def __init__(self, embed_dim: int, patch_size: int, in_chans: int = 3, activation: str = "gelu") -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.act = ACT_LAYERS[activation]()
        self.norm = nn.BatchNorm2d(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.conv(x)))


class ConvMixerBlock(DepthwiseConvBN):
    """One ConvMixer block on (B, dim, H, W): ``x = x + BN(act(dwconv(x)))`` (the fused
    :class:`DepthwiseConvBN`, its children ``depth_wise_conv``, ``act1``, ``norm1``), then ``BN(act(pwconv(x)))``."""

    def __init__(self, dim: int, kernel_size: int, activation: str = "gelu") -> None:
        super().__init__(
            dim, kernel_size, padding="same", activation=activation, names=("depth_wise_conv", "act1", "norm1")
        )
        self.point_wise_conv = nn.Conv2d(dim, dim, kernel_size=1)
        self.act2 = ACT_LAYERS[activation]()
        self.norm2 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x, residual=x)
        return self.norm2(self.act2(self.point_wise_conv(x)))


class ConvMixer(ClassifierModel):
    """ConvMixer-h/d: (B, in_chans, H, W) -> (B, num_classes).

    Args:
        embed_dim: h, the channels of the patch embedding and of every block.
        depth: d, the number of blocks.
        kernel_size: k of the depthwise convolution.
        patch_size: p, the side and stride of the patch embedding.
        activation: "gelu" or "relu".
        img_size: accepted for ``create_model``; any input size divisible into patches works.
    """

    def __init__(
        self,
        embed_dim: int = 768,
        depth: int = 32,
        kernel_size: int = 9,
        patch_size: int = 7,
        in_chans: int = 3,
        num_classes: int = 1000,
        activation: str = "gelu",
        img_size: int = 224,
    ) -> None:
        super().__init__()
        if activation not in ACT_LAYERS:
            raise ValueError(f"activation: expected one of {tuple(ACT_LAYERS)}, got {activation!r}")
        self.num_features = embed_dim
        self.img_size = img_size
        self.patch_emb = ConvMixerStem(embed_dim, patch_size, in_chans, activation)
        self.blocks = nn.Sequential(*[ConvMixerBlock(embed_dim, kernel_size, activation) for _ in range(depth)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reset_classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, embed_dim, H / p, W / p)."""
        return self.blocks(self.patch_emb(x))

    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim, h, w) -> the average (B, embed_dim)."""
        return self.pool(x).flatten(1)


@register_model
def convmixer_1536_20(**kwargs) -> ConvMixer:
    """ConvMixer-1536/20, kernel 9, patch 7 (51.6 M parameters)."""
    return _create(ConvMixer, dict(embed_dim=1536, depth=20, kernel_size=9, patch_size=7), kwargs)


@register_model
def convmixer_768_32(**kwargs) -> ConvMixer:
    """ConvMixer-768/32, kernel 7, patch 7, ReLU as in the paper (21.1 M parameters)."""
    return _create(ConvMixer, dict(embed_dim=768, depth=32, kernel_size=7, patch_size=7, activation="relu"), kwargs)


@register_model
def convmixer_1024_20_ks9_p14(**kwargs) -> ConvMixer:
    """ConvMixer-1024/20, kernel 9, patch 14 (24.4 M parameters)."""
    return _create(ConvMixer, dict(embed_dim=1024, depth=20, kernel_size=9, patch_size=14), kwargs)
