"""Attention blocks of the seed models on the fused biased-attention ops.

* :class:`RelPosAttention`: CoAtNet's relative attention (the seed's ``Attention`` in ``coatnet_article.txt``):
  tokens (B, N, inp) in, (B, N, oup) out, running :func:`vitkern.ops.rel_pos_attention`.
* :class:`LeViTAttention`: LeViT's attention and its downsampling ("shrink") form (the seed's ``Attention`` in the
  LeViT section of ``deepvit_deit_cait_t2t_crossvit_pit_levit_cvt_article.txt``, vit-pytorch's layout): feature
  maps (B, dim, R, R) in, (B, dim_out, R', R') out, running :func:`vitkern.ops.levit_attention`.

Parameter names and shapes are the seed's, so a seed state_dict loads with ``strict=True``. The seed modules also
save an index buffer (``relative_index``, ``pos_indices``); the fused ops compute the index from token coordinates,
so these modules have no such buffer: a load-state-dict pre-hook checks a saved index against the one the module
computes and drops it. Loading one of these modules' state_dicts into a seed module therefore needs
``strict=False`` there (its constructor builds the same buffer).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from vitkern import ops, reference
from vitkern.kernels.contract import BIAS_LEVIT


def _drop_saved_index(
    state_dict: dict[str, torch.Tensor], key: str, expected: torch.Tensor, error_msgs: list[str]
) -> None:
    """Remove the seed's index buffer ``key`` from ``state_dict``, reporting an error if it is not ``expected``."""
    saved = state_dict.pop(key, None)
    if saved is None:
        return
    if tuple(saved.shape) != tuple(expected.shape) or not torch.equal(saved.cpu().long(), expected):
        error_msgs.append(
            f"{key}: the saved index (shape {tuple(saved.shape)}) differs from the index of this module's geometry "
            f"(shape {tuple(expected.shape)}); the state_dict was saved from a module of another size"
        )


DEFAULT_NUM_HEADS = 8
DEFAULT_HEAD_DIM = 32


def _renamed_argument(
    owner: str, old: str, old_value: int | None, new: str, new_value: int | None, default: int
) -> int:
    """The value of keyword ``new`` (``None`` when not passed) of ``owner`` when the caller may still pass its
    deprecated name ``old``: ``old_value`` (with a DeprecationWarning) if given, else ``new_value``, else ``default``;
    both given raises TypeError."""
    if old_value is None:
        return default if new_value is None else new_value
    if new_value is not None:
        raise TypeError(f"{old}: deprecated name of {new}; got both {old}={old_value!r} and {new}={new_value!r}")
    warnings.warn(
        f"{owner}: the keyword {old}= is deprecated, use {new}= (timm's name)", DeprecationWarning, stacklevel=3
    )
    return old_value


def _renamed_attribute(owner: str, old: str, new: str, value: int) -> int:
    warnings.warn(f"{owner}.{old} is deprecated, use {new}", DeprecationWarning, stacklevel=3)
    return value


class RelPosAttention(nn.Module):
    """CoAtNet's multi-head self-attention with a learned relative-position bias table.

    ``to_out(softmax(scale * q @ k^T + bias) @ v)`` with q, k, v from ``to_qkv(x)`` and
    bias[h, i, j] = relative_bias_table[(yi-yj+ih-1)*(2iw-1) + (xi-xj+iw-1), h].

    Args:
        inp: input channels.
        oup: output channels.
        image_size: (ih, iw), the feature map the tokens come from; N = ih * iw.
        num_heads: number of heads (default 8).
        head_dim: head dim of q, k and v (default 32).
        dropout: dropout after the output projection.
        heads, dim_head: the seed's names of ``num_heads`` and ``head_dim``, deprecated (a DeprecationWarning);
            they will be removed in the release after 0.1.

    Parameters (the seed's names): ``to_qkv.weight`` (3 * num_heads * head_dim, inp); ``relative_bias_table``
    ((2ih-1)(2iw-1), num_heads); ``to_out.0.weight``/``.bias`` unless num_heads == 1 and head_dim == inp, where
    ``to_out`` is the identity.
    """

    def __init__(
        self,
        inp: int,
        oup: int,
        image_size: tuple[int, int],
        num_heads: int | None = None,
        head_dim: int | None = None,
        dropout: float = 0.0,
        *,
        heads: int | None = None,
        dim_head: int | None = None,
    ) -> None:
        super().__init__()
        num_heads = _renamed_argument("RelPosAttention", "heads", heads, "num_heads", num_heads, DEFAULT_NUM_HEADS)
        head_dim = _renamed_argument("RelPosAttention", "dim_head", dim_head, "head_dim", head_dim, DEFAULT_HEAD_DIM)
        inner_dim = head_dim * num_heads
        project_out = not (num_heads == 1 and head_dim == inp)
        self.ih, self.iw = image_size
        self.inp = inp
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.relative_bias_table = nn.Parameter(torch.zeros((2 * self.ih - 1) * (2 * self.iw - 1), num_heads))
        self.to_qkv = nn.Linear(inp, inner_dim * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, oup), nn.Dropout(dropout)) if project_out else nn.Identity()
        self.register_load_state_dict_pre_hook(RelPosAttention._load_hook)

    def _load_hook(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        expected = reference.rel_pos_index((self.ih, self.iw)).flatten().unsqueeze(1)
        _drop_saved_index(state_dict, prefix + "relative_index", expected, error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, inp) tokens, N = ih * iw in row-major order -> (B, N, oup)."""
        tokens = self.ih * self.iw
        if x.dim() != 3 or x.shape[1] != tokens or x.shape[2] != self.inp:
            raise ValueError(
                f"x: expected (batch, {tokens}, {self.inp}) for a {self.ih}x{self.iw} feature map of {self.inp} "
                f"channels, got {tuple(x.shape)}"
            )
        batch = x.shape[0]
        qkv = self.to_qkv(x).view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        table = self.relative_bias_table.to(q.dtype)
        out = ops.rel_pos_attention(q, k, v, table, (self.ih, self.iw), self.scale)
        return self.to_out(out.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim))

    @property
    def heads(self) -> int:
        """Deprecated name of :attr:`num_heads`."""
        return _renamed_attribute("RelPosAttention", "heads", "num_heads", self.num_heads)

    @property
    def dim_head(self) -> int:
        """Deprecated name of :attr:`head_dim`."""
        return _renamed_attribute("RelPosAttention", "dim_head", "head_dim", self.head_dim)


class LeViTAttention(nn.Module):
    """LeViT's attention with learned per-offset biases; ``downsample=True`` is its shrink attention.

    q, k, v come from 1x1 convolutions + BatchNorm of the (B, dim, R, R) feature map (q with stride 2 when
    downsampling, so the queries sit on the ceil(R/2) x ceil(R/2) grid); out =
    ``to_out(softmax(scale * q @ k^T + bias / scale) @ v)`` with bias[h, i, j] =
    pos_bias.weight[|s*yi - yj| * R + |s*xi - xj|, h]. The bias is divided by ``scale`` (= key_dim ** -0.5) as the
    seed does, so seed weights give the seed's outputs.

    Input layout: (B, C, H, W) feature maps, as the seed's LeViT (timm's LeViT takes (B, N, C) tokens and names its
    parameters ``qkv``/``proj``/``attention_biases``; this module keeps the seed's names and layout).

    In eval mode on the CPU path (backend "auto", CPU tensors), when no gradient flows to ``pos_bias``, the gathered
    bias is cached as timm does; the cache is dropped on ``train()``, on ``.to()``/``.half()`` and whenever
    ``pos_bias.weight`` changes (an optimizer step, ``load_state_dict``, a new Parameter).

    Args:
        dim: input channels.
        fmap_size: R, the side of the input feature map.
        num_heads: number of heads (default 8).
        key_dim: head dim of q and k (default 32).
        value_dim: head dim of v (default 64).
        dropout: dropout at the end of ``to_out``.
        dim_out: output channels (default ``dim``).
        downsample: stride-2 queries (shrink attention); the output map is ceil(R/2) x ceil(R/2).
        act_layer: activation at the start of ``to_out`` (the seed's GELU; the LeViT paper uses Hardswish).
        heads, dim_key, dim_value: the seed's names of ``num_heads``, ``key_dim`` and ``value_dim``, deprecated (a
            DeprecationWarning); they will be removed in the release after 0.1.

    Parameters (the seed's names): ``to_q``, ``to_k``, ``to_v``: Sequential(Conv2d 1x1 without bias, BatchNorm2d);
    ``to_out``: Sequential(act, Conv2d 1x1, BatchNorm2d with zero-initialised weight, Dropout); ``pos_bias``:
    ``nn.Embedding(R * R, num_heads)``, handed to the op as ``pos_bias.weight.t() / scale`` (num_heads, R*R): a
    (num_heads x R*R)
    elementwise op that keeps the transposed layout, which the kernel reads through its strides.
    """

    def __init__(
        self,
        dim: int,
        fmap_size: int,
        num_heads: int | None = None,
        key_dim: int | None = None,
        value_dim: int | None = None,
        dropout: float = 0.0,
        dim_out: int | None = None,
        downsample: bool = False,
        act_layer: type[nn.Module] = nn.GELU,
        *,
        heads: int | None = None,
        dim_key: int | None = None,
        dim_value: int | None = None,
    ) -> None:
        super().__init__()
        num_heads = _renamed_argument("LeViTAttention", "heads", heads, "num_heads", num_heads, 8)
        key_dim = _renamed_argument("LeViTAttention", "dim_key", dim_key, "key_dim", key_dim, 32)
        value_dim = _renamed_argument("LeViTAttention", "dim_value", dim_value, "value_dim", value_dim, 64)
        inner_dim_key = key_dim * num_heads
        inner_dim_value = value_dim * num_heads
        dim_out = dim if dim_out is None else dim_out
        self.dim = dim
        self.fmap_size = fmap_size
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.value_dim = value_dim
        self.stride = 2 if downsample else 1
        self.scale = key_dim**-0.5
        self.to_q = nn.Sequential(
            nn.Conv2d(dim, inner_dim_key, 1, stride=self.stride, bias=False), nn.BatchNorm2d(inner_dim_key)
        )
        self.to_k = nn.Sequential(nn.Conv2d(dim, inner_dim_key, 1, bias=False), nn.BatchNorm2d(inner_dim_key))
        self.to_v = nn.Sequential(nn.Conv2d(dim, inner_dim_value, 1, bias=False), nn.BatchNorm2d(inner_dim_value))
        out_batch_norm = nn.BatchNorm2d(dim_out)
        nn.init.zeros_(out_batch_norm.weight)
        self.to_out = nn.Sequential(
            act_layer(), nn.Conv2d(inner_dim_value, dim_out, 1), out_batch_norm, nn.Dropout(dropout)
        )
        self.pos_bias = nn.Embedding(fmap_size * fmap_size, num_heads)
        self._bias_cache: tuple[torch.Tensor, int, torch.Tensor] | None = None
        self.register_load_state_dict_pre_hook(LeViTAttention._load_hook)

    @property
    def heads(self) -> int:
        """Deprecated name of :attr:`num_heads`."""
        return _renamed_attribute("LeViTAttention", "heads", "num_heads", self.num_heads)

    def _load_hook(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        expected = reference.levit_index(self.fmap_size, self.stride)
        _drop_saved_index(state_dict, prefix + "pos_indices", expected, error_msgs)

    def train(self, mode: bool = True) -> LeViTAttention:
        self._bias_cache = None
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self._bias_cache = None
        return super()._apply(fn, recurse)

    def biases(self) -> torch.Tensor:
        """(heads, R*R): the learned biases as the op reads them, the seed's ``1 / scale`` factor applied."""
        return self.pos_bias.weight.t() / self.scale

    def _cached_bias(self) -> torch.Tensor:
        """The gathered (heads, Nq, Nk) bias, recomputed only when ``pos_bias.weight`` changed."""
        weight = self.pos_bias.weight
        cache = self._bias_cache
        if cache is None or cache[0] is not weight or cache[1] != weight._version:
            with torch.no_grad():
                bias = reference.levit_bias(self.biases(), self.fmap_size, self.stride)
            cache = self._bias_cache = (weight, weight._version, bias)
        return cache[2]

    def _use_cache(self, q: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether this call takes the cached dense bias: in eval mode without gradients, where the op runs on the
        CPU path (the fused kernels gather the biases themselves)."""
        needs_grad = torch.is_grad_enabled() and self.pos_bias.weight.requires_grad
        return (
            not self.training
            and not needs_grad
            and not torch.compiler.is_compiling()
            and ops.attention.implementation("levit_attention", q, v, BIAS_LEVIT) == "cpu"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, dim, R, R) -> (B, dim_out, R', R'), R' = R (ceil(R/2) when downsampling)."""
        size = self.fmap_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.dim, size, size):
            raise ValueError(
                f"x: expected (batch, {self.dim}, {size}, {size}) for a {size}x{size} feature map of {self.dim} "
                f"channels, got {tuple(x.shape)}"
            )
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        batch, _, rows, cols = q.shape
        q, k, v = (t.reshape(batch, self.num_heads, -1, t.shape[2] * t.shape[3]).transpose(2, 3) for t in (q, k, v))
        if self._use_cache(q, v):
            out = ops.biased_attention(q, k, v, self._cached_bias().to(q.dtype), self.scale)
        else:
            out = ops.levit_attention(q, k, v, self.biases().to(q.dtype), size, self.stride, self.scale)
        out = out.transpose(2, 3).reshape(batch, -1, rows, cols)
        return self.to_out(out)
