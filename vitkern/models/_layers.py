"""Transformer layers shared by vitkern's vision-transformer models.

Token tensors are (batch, tokens, dim); per-head tensors are (batch, heads, tokens, head_dim).

Plain softmax attention runs on the current backend (:func:`vitkern.current_backend`): ``eager`` computes it as the
seed code does (matmul, softmax, dropout, matmul), every other backend calls
:func:`torch.nn.functional.scaled_dot_product_attention`. The parameters are the same on every backend.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitkern._backend import current_backend
from vitkern.ops.depthwise_conv import depthwise_conv2d

INIT_STD = 0.02
LN_EPS = 1e-6


def uses_sdpa() -> bool:
    """Whether plain attention goes through ``F.scaled_dot_product_attention`` (every backend but ``eager``)."""
    return current_backend() != "eager"


def scaled_dot_product(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``softmax(scale * q @ k^T) @ v`` with dropout ``dropout_p`` on the attention weights.

    q: (B, H, Nq, D), k: (B, H, Nk, D), v: (B, H, Nk, Dv) -> (B, H, Nq, Dv). ``scale`` defaults to D ** -0.5. The
    caller passes ``dropout_p`` 0 outside training.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if uses_sdpa():
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    attn = torch.matmul(q, k.transpose(-1, -2)) * scale
    attn = attn.softmax(dim=-1)
    attn = F.dropout(attn, dropout_p, training=dropout_p > 0.0)
    return torch.matmul(attn, v)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H*D) -> (B, H, N, D)."""
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> (B, N, H*D)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def check_image_size(x: torch.Tensor, img_size: tuple[int, int]) -> None:
    """Raise ValueError unless ``x`` is a (B, C, H, W) batch of ``img_size`` images (position embeddings and
    token grids are sized at construction)."""
    if x.ndim != 4:
        raise ValueError(f"x: expected a (batch, channels, height, width) image batch, got shape {tuple(x.shape)}")
    got = (x.shape[-2], x.shape[-1])
    if got != tuple(img_size):
        raise ValueError(
            f"x: the model was built for img_size {img_size[0]}x{img_size[1]}, got images of "
            f"{got[0]}x{got[1]}; build it with create_model(..., img_size={got[0]}) for that size"
        )


def to_pair(name: str, value: int | tuple[int, int]) -> tuple[int, int]:
    """An int or a pair of positive ints as a pair; ValueError naming ``name`` otherwise."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"{name}: expected a positive int or a pair of positive ints, got {value!r}")
    return pair


def layer_norm(dim: int) -> nn.LayerNorm:
    """LayerNorm with eps 1e-6, as the DeiT, CaiT, CrossViT and DeepViT code use."""
    return nn.LayerNorm(dim, eps=LN_EPS)


def init_weights(module: nn.Module) -> None:
    """timm's ViT initialisation: truncated-normal (std 0.02) Linear weights, zero biases, unit LayerNorms.

    Use as ``model.apply(init_weights)``.
    """
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability ``drop_prob`` in training, scaling the
    kept ones by 1 / (1 - drop_prob). x: (B, ...) -> same shape."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob: expected a probability in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class LayerScale(nn.Module):
    """CaiT's per-channel residual scaling ``x * diag(scale)``, ``scale`` initialised to ``init_values``.

    x: (..., dim) -> same shape.
    """

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Mlp(nn.Module):
    """Transformer feed-forward: Linear, activation, dropout, Linear, dropout (the seed's ``FeedForward``).

    x: (..., in_features) -> (..., out_features).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class MultiHeadAttentionBase(nn.Module):
    """What self- and cross-attention share: heads, scale, attention dropout and the output projection ``to_out``.

    ``head_dim`` defaults to dim // num_heads; ``qk_scale`` to head_dim ** -0.5. Subclasses add their q/k/v
    projections of width ``inner_dim`` (= num_heads * head_dim).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        head_dim: int | None = None,
    ) -> None:
        super().__init__()
        head_dim = head_dim or dim // num_heads
        self.inner_dim = head_dim * num_heads
        self.num_heads = num_heads
        self.scale = qk_scale or head_dim**-0.5
        self.attn_drop = attn_drop
        self.to_out = nn.Linear(self.inner_dim, dim)
        self.out_drop = nn.Dropout(proj_drop)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Per-head (B, H, N, D) q, k, v -> the projected (B, Nq, dim) output (SDPA off the ``eager`` backend)."""
        out = scaled_dot_product(q, k, v, self.scale, self.attn_drop if self.training else 0.0)
        return self.project(out)

    def project(self, out: torch.Tensor) -> torch.Tensor:
        """(B, H, Nq, D) per-head output -> (B, Nq, dim) through ``to_out`` and dropout."""
        return self.out_drop(self.to_out(merge_heads(out)))


class Attention(MultiHeadAttentionBase):
    """Multi-head self-attention (the seed's ``Attention``: ``to_qkv``, ``to_out``).

    x: (B, N, dim) -> (B, N, dim). Runs on SDPA on every backend but ``eager``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        head_dim: int | None = None,
    ) -> None:
        super().__init__(dim, num_heads, qk_scale, attn_drop, proj_drop, head_dim)
        self.to_qkv = nn.Linear(dim, self.inner_dim * 3, bias=qkv_bias)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, dim) -> q, k, v, each (B, heads, N, head_dim)."""
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        return split_heads(q, self.num_heads), split_heads(k, self.num_heads), split_heads(v, self.num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(*self.qkv(x))


class CrossAttention(MultiHeadAttentionBase):
    """Multi-head attention of queries ``x`` over ``context`` (the seed's CrossViT ``Attention``: ``to_q``,
    ``to_kv``, ``to_out``); CaiT's class attention and CrossViT's fusion use it.

    x: (B, Nq, dim), context: (B, Nk, dim) (None: x itself) -> (B, Nq, dim). With ``kv_include_self`` the keys and
    values are ``cat(x, context)``, as the seed's cross attention lets the CLS token attend to itself. Runs on SDPA
    on every backend but ``eager``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        head_dim: int | None = None,
    ) -> None:
        super().__init__(dim, num_heads, qk_scale, attn_drop, proj_drop, head_dim)
        self.to_q = nn.Linear(dim, self.inner_dim, bias=qkv_bias)
        self.to_kv = nn.Linear(dim, self.inner_dim * 2, bias=qkv_bias)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, kv_include_self: bool = False
    ) -> torch.Tensor:
        if context is None:
            context = x
        if kv_include_self:
            context = torch.cat((x, context), dim=1)
        q = split_heads(self.to_q(x), self.num_heads)
        k, v = (split_heads(t, self.num_heads) for t in self.to_kv(context).chunk(2, dim=-1))
        return self.attend(q, k, v)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + drop_path(ls1(attn(norm1(x))))``, then the same with the Mlp.

    x: (B, N, dim) -> (B, N, dim). ``attn_layer`` is called as
    ``attn_layer(dim, num_heads=, qkv_bias=, qk_scale=, attn_drop=, proj_drop=)``; ``init_values`` None leaves
    out LayerScale.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        init_values: float | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        attn_layer: Callable[..., nn.Module] = Attention,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_layer(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop
        )
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens by a strided convolution (equal to the seed's rearrange + Linear).

    x: (B, in_chans, *img_size) -> (B, grid_h * grid_w, embed_dim); another image size raises ValueError.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
    ) -> None:
        super().__init__()
        self.img_size = to_pair("img_size", img_size)
        self.patch_size = to_pair("patch_size", patch_size)
        if self.img_size[0] % self.patch_size[0] or self.img_size[1] % self.patch_size[1]:
            raise ValueError(
                f"img_size: expected a multiple of patch_size {self.patch_size}, got {self.img_size}"
            )
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_size(x, self.img_size)
        return self.proj(x).flatten(2).transpose(1, 2)


def drop_path_rates(drop_path_rate: float, depth: int) -> list[float]:
    """Stochastic-depth rate of each of ``depth`` blocks, rising linearly from 0 to ``drop_path_rate``."""
    return [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]


def block_stack(depth: int, drop_path_rate: float, dim: int, num_heads: int, **block_kwargs) -> nn.Sequential:
    """``depth`` Blocks of width ``dim`` with stochastic-depth rates from ``drop_path_rates``; ``block_kwargs`` go
    to every Block."""
    return nn.Sequential(
        *(Block(dim, num_heads, drop_path=rate, **block_kwargs) for rate in drop_path_rates(drop_path_rate, depth))
    )


def make_head(dim: int, num_classes: int) -> nn.Module:
    """The classifier: Linear(dim, num_classes), or Identity for ``num_classes`` 0 (features only)."""
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes: expected an int >= 0, got {num_classes!r}")
    return nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()


class ClassifierModel(nn.Module):
    """timm's classifier interface: ``forward`` is ``forward_head(forward_features(x))``, and the head is a
    ``make_head`` Linear on ``num_features`` kept under the attribute ``head_name``.

    Subclasses set ``num_classes``, ``num_features`` and the head, define ``forward_features`` and, where those
    features are not already (B, num_features), ``pool_features``.
    """

    head_name = "head"
    num_classes: int
    num_features: int

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a fresh one for ``num_classes`` (0: no classifier, features out)."""
        self.num_classes = num_classes
        setattr(self, self.head_name, make_head(self.num_features, num_classes))

    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        """``forward_features``' output -> (B, num_features)."""
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Features -> logits (B, num_classes), or the pooled (B, num_features) if ``pre_logits``."""
        x = self.pool_features(x)
        return x if pre_logits else getattr(self, self.head_name)(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))


class ClassTokenModel(ClassifierModel):
    """A classifier whose head reads the class token (token 0) through ``mlp_head``; ``forward_features`` returns
    (B, N, num_features) tokens."""

    head_name = "mlp_head"

    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


# --- depthwise convolution with BatchNorm (ConvMixer, CvT, CoAtNet) ---------------------------------------------


def bn_uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    """Whether ``bn`` normalises with the batch's statistics (training, or no running statistics kept)."""
    return bn.training or bn.running_mean is None


def fold_batchnorm(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (C,), with ``bn(z) == z * scale + shift`` for an inference-mode BatchNorm.

    Differentiable in ``bn.weight`` and ``bn.bias``, so training through the folded form updates them.
    """
    scale = torch.rsqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * scale
    if bn.weight is not None:
        scale = scale * bn.weight
        shift = shift * bn.weight
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def depthwise_act_bn(
    x: torch.Tensor,
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``bn(act(conv(x))) (+ residual)`` for a depthwise ``conv`` on :func:`vitkern.ops.depthwise_conv2d`.

    When ``bn`` normalises with its running statistics (eval mode) this is one op call, the BatchNorm folded into
    the epilogue's scale and shift and the residual added in the same pass; otherwise the conv and activation are
    fused and BatchNorm (batch statistics) and the residual follow. Parameters are cast to x's dtype (autocast).
    x: (B, C, H, W) -> (B, C, H', W').
    """
    weight = conv.weight.to(x.dtype)
    bias = None if conv.bias is None else conv.bias.to(x.dtype)
    if bn_uses_batch_stats(bn):
        y = bn(depthwise_conv2d(x, weight, bias, conv.stride, conv.padding, activation=activation))
        return y if residual is None else y + residual
    scale, shift = fold_batchnorm(bn)
    return depthwise_conv2d(
        x, weight, bias, conv.stride, conv.padding, activation=activation, scale=scale.to(x.dtype),
        shift=shift.to(x.dtype), residual=residual,
    )
