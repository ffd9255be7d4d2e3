"""CvT, the convolutional vision transformer ("CvT: Introducing Convolutions to Vision Transformers", Wu et al.,
ICCV 2021).

Three stages, each a convolutional token embedding (an overlapping strided convolution and LayerNorm) and
transformer blocks whose queries, keys and values come from convolutional projections: a depthwise 3x3 convolution
and BatchNorm on the token map (stride 1 for queries, stride 2 for keys and values, the "squeezed" projection),
flattened and mapped by a Linear layer. The last stage carries a class token, which skips the convolutions; the
head is LayerNorm + Linear on it.

Backends: on ``eager`` every layer is the plain PyTorch module and attention is matmul-softmax; on the other
backends the depthwise convolutions run :func:`vitkern.ops.depthwise_conv2d` (in eval mode with the BatchNorm folded
into the epilogue's scale and shift) and attention runs SDPA.

Departures from lucidrains/vit-pytorch (``vit_pytorch/cvt.py``), following the paper and its official code
(microsoft/CvT ``lib/models/cls_cvt.py``): separate depthwise convolution + BatchNorm projections for q, k and v
followed by Linear layers with biases (vit-pytorch shares one depthwise convolution between k and v and uses 1x1
convolutions without bias); a class token in the last stage classified through LayerNorm (vit-pytorch
average-pools); the 7x7 stride-4 first embedding pads by 2. The attention scale is head_dim ** -0.5 as in
vit-pytorch (the official code uses dim ** -0.5).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vitkern.models._layers import (
    ClassifierModel,
    DepthwiseConvBN,
    check_stage_lengths,
    Mlp,
    merge_heads,
    scaled_dot_product,
    split_heads,
    to_map,
    to_tokens,
    trunc_normal_init,
)
from vitkern.models._registry import _create, register_model

PROJ_KERNEL = 3
CLS_STD = 0.02


class CvTAttention(nn.Module):
    """Multi-head attention with convolutional projections: tokens (B, [1 +] H*W, dim) of an H x W map (after an
    optional class token) -> (B, [1 +] H*W, dim). Each projection ``conv_proj_*`` is a depthwise conv (k x k,
    stride 1 for q, ``kv_stride`` for k and v, no bias) + BatchNorm (:class:`DepthwiseConvBN`), flattened to
    tokens."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int = PROJ_KERNEL, kv_stride: int = 2) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.conv_proj_q = DepthwiseConvBN(dim, kernel_size, 1, kernel_size // 2, bias=False)
        self.conv_proj_k = DepthwiseConvBN(dim, kernel_size, kv_stride, kernel_size // 2, bias=False)
        self.conv_proj_v = DepthwiseConvBN(dim, kernel_size, kv_stride, kernel_size // 2, bias=False)
        self.proj_q = nn.Linear(dim, dim)
        self.proj_k = nn.Linear(dim, dim)
        self.proj_v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, size: tuple[int, int], has_cls: bool) -> torch.Tensor:
        cls_token, tokens = (x[:, :1], x[:, 1:]) if has_cls else (None, x)
        fmap = to_map(tokens, size)
        q, k, v = (to_tokens(proj(fmap)) for proj in (self.conv_proj_q, self.conv_proj_k, self.conv_proj_v))
        if cls_token is not None:
            q, k, v = (torch.cat((cls_token, t), dim=1) for t in (q, k, v))
        q = split_heads(self.proj_q(q), self.num_heads)
        k = split_heads(self.proj_k(k), self.num_heads)
        v = split_heads(self.proj_v(v), self.num_heads)
        return self.proj(merge_heads(scaled_dot_product(q, k, v, self.scale)))


class CvTBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))`` on (B, [1 +] H*W, dim)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CvTAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, size: tuple[int, int], has_cls: bool) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), size, has_cls)
        return x + self.mlp(self.norm2(x))


class CvTEmbed(nn.Module):
    """Convolutional token embedding: (B, C_in, H, W) -> conv -> (B, dim, H', W') with LayerNorm over channels."""

    def __init__(self, in_chans: int, dim: int, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size, stride, padding)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return to_map(self.norm(to_tokens(x)), x.shape[-2:])


class CvTStage(nn.Module):
    """Embedding and blocks: (B, C_in, H, W) -> ((B, dim, H', W'), class token (B, 1, dim) or None)."""

    def __init__(
        self,
        in_chans: int,
        dim: int,
        depth: int,
        num_heads: int,
        embed_kernel: int,
        embed_stride: int,
        embed_padding: int,
        mlp_ratio: float,
        cls_token: bool,
    ) -> None:
        super().__init__()
        self.patch_embed = CvTEmbed(in_chans, dim, embed_kernel, embed_stride, embed_padding)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.blocks = nn.ModuleList([CvTBlock(dim, num_heads, mlp_ratio) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.patch_embed(x)
        size = x.shape[-2:]
        tokens = to_tokens(x)
        has_cls = self.cls_token is not None
        if has_cls:
            tokens = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), tokens), dim=1)
        for block in self.blocks:
            tokens = block(tokens, size, has_cls)
        cls_token = tokens[:, :1] if has_cls else None
        fmap = tokens[:, 1:] if has_cls else tokens
        return to_map(fmap, size), cls_token


class CvT(ClassifierModel):
    """CvT: (B, in_chans, H, W) -> (B, num_classes); any input size the embeddings can stride over works.

    Args:
        embed_dim, depth, num_heads: per stage (CvT-13: (64, 192, 384), (1, 2, 10), (1, 3, 6)).
        embed_kernels, embed_strides, embed_paddings: each stage's token-embedding convolution.
        img_size: accepted for ``create_model``; CvT has no position embedding, so it is not enforced.
    """

    def __init__(
        self,
        embed_dim: tuple[int, ...] = (64, 192, 384),
        depth: tuple[int, ...] = (1, 2, 10),
        num_heads: tuple[int, ...] = (1, 3, 6),
        embed_kernels: tuple[int, ...] = (7, 3, 3),
        embed_strides: tuple[int, ...] = (4, 2, 2),
        embed_paddings: tuple[int, ...] = (2, 1, 1),
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
        num_classes: int = 1000,
        img_size: int = 224,
    ) -> None:
        super().__init__()
        per_stage = (embed_dim, depth, num_heads, embed_kernels, embed_strides, embed_paddings)
        check_stage_lengths("embed_dim, depth, num_heads, embed_kernels, embed_strides, embed_paddings", *per_stage)
        self.num_features = embed_dim[-1]
        self.img_size = img_size
        stages = []
        for i, (dim, stage_depth, heads, kernel, stride, padding) in enumerate(zip(*per_stage)):
            stages.append(
                CvTStage(
                    embed_dim[i - 1] if i > 0 else in_chans,
                    dim,
                    stage_depth,
                    heads,
                    kernel,
                    stride,
                    padding,
                    mlp_ratio,
                    cls_token=i == len(embed_dim) - 1,
                )
            )
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(embed_dim[-1])
        self.reset_classifier(num_classes)
        self.apply(trunc_normal_init)
        nn.init.trunc_normal_(self.stages[-1].cls_token, std=CLS_STD)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> the normalised class token (B, num_features)."""
        cls_token = None
        for stage in self.stages:
            x, cls_token = stage(x)
        return self.norm(cls_token[:, 0])


@register_model
def cvt_13(**kwargs) -> CvT:
    """CvT-13 (20 M parameters)."""
    return _create(CvT, dict(embed_dim=(64, 192, 384), depth=(1, 2, 10), num_heads=(1, 3, 6)), kwargs)


@register_model
def cvt_21(**kwargs) -> CvT:
    """CvT-21 (32 M parameters)."""
    return _create(CvT, dict(embed_dim=(64, 192, 384), depth=(1, 4, 16), num_heads=(1, 3, 6)), kwargs)
