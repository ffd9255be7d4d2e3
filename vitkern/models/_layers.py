"""Layers shared by the families of vitkern's model set.

Token tensors are (batch, tokens, dim); per-head tensors are (batch, heads, tokens, head_dim).

Plain softmax attention runs on the current backend (:func:`vitkern.current_backend`): ``eager`` computes it as
timm's ``Attention`` does without its fused path (matmul, softmax, dropout, matmul; huggingface/pytorch-image-models
``timm/models/vision_transformer.py``), every other backend calls
:func:`torch.nn.functional.scaled_dot_product_attention`. The parameters are the same on every backend.

The classifier interface (:class:`ClassifierModel`), the ViT trunk (:class:`VisionTransformer`) and the depthwise
convolution with BatchNorm (:class:`DepthwiseConvBN`) live here too: each family builds on them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

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


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, H*D) -> (B, H, N, D)."""
    return rearrange(x, "b n (h d) -> b h n d", h=num_heads)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> (B, N, H*D)."""
    return rearrange(x, "b h n d -> b n (h d)")


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """A feature map (B, C, H, W) -> row-major tokens (B, H*W, C)."""
    return rearrange(x, "b c h w -> b (h w) c")


def to_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Row-major tokens (B, H*W, C) -> a feature map (B, C, H, W) of ``size`` (H, W)."""
    return rearrange(x, "b (h w) c -> b c h w", h=size[0], w=size[1])


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


def trunc_normal_init(module: nn.Module) -> None:
    """timm's ViT initialisation: truncated-normal (std 0.02) Linear weights, zero biases, unit LayerNorms.

    Use as ``model.apply(trunc_normal_init)``.
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
    """Transformer feed-forward: Linear, activation, dropout, Linear, dropout (timm's ``Mlp``,
    ``timm/layers/mlp.py``).

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
    """What self- and cross-attention share: heads, scale, attention dropout, the output projection ``to_out`` and
    the constructor.

    ``head_dim`` defaults to dim // num_heads; ``qk_scale`` to head_dim ** -0.5. Subclasses add their q/k/v
    projections of width ``inner_dim`` (= num_heads * head_dim) in :meth:`build_projections`, which the constructor
    calls last.
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
        super().__init__()
        head_dim = head_dim or dim // num_heads
        self.inner_dim = head_dim * num_heads
        self.num_heads = num_heads
        self.scale = qk_scale or head_dim**-0.5
        self.attn_drop = attn_drop
        self.to_out = nn.Linear(self.inner_dim, dim)
        self.out_drop = nn.Dropout(proj_drop)
        self.build_projections(dim, qkv_bias)

    def build_projections(self, dim: int, bias: bool) -> None:
        """Add the q/k/v projections from width ``dim`` to ``inner_dim`` (with biases when ``bias``)."""
        raise NotImplementedError

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Per-head (B, H, N, D) q, k, v -> the projected (B, Nq, dim) output (SDPA off the ``eager`` backend)."""
        out = scaled_dot_product(q, k, v, self.scale, self.attn_drop if self.training else 0.0)
        return self.project(out)

    def project(self, out: torch.Tensor) -> torch.Tensor:
        """(B, H, Nq, D) per-head output -> (B, Nq, dim) through ``to_out`` and dropout."""
        return self.out_drop(self.to_out(merge_heads(out)))


class Attention(MultiHeadAttentionBase):
    """Multi-head self-attention with lucidrains/vit-pytorch's names (``vit_pytorch/vit.py`` ``Attention``:
    ``to_qkv``, ``to_out``).

    x: (B, N, dim) -> (B, N, dim). Runs on SDPA on every backend but ``eager``. Constructor arguments: those of
    :class:`MultiHeadAttentionBase`.
    """

    def build_projections(self, dim: int, bias: bool) -> None:
        self.to_qkv = nn.Linear(dim, self.inner_dim * 3, bias=bias)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, dim) -> q, k, v, each (B, heads, N, head_dim)."""
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        return split_heads(q, self.num_heads), split_heads(k, self.num_heads), split_heads(v, self.num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(*self.qkv(x))


class CrossAttention(MultiHeadAttentionBase):
    """Multi-head attention of queries ``x`` over ``context`` (lucidrains/vit-pytorch ``vit_pytorch/cross_vit.py``
    ``Attention``: ``to_q``, ``to_kv``, ``to_out``); CaiT's class attention and CrossViT's fusion use it.

    x: (B, Nq, dim), context: (B, Nk, dim) (None: x itself) -> (B, Nq, dim). With ``kv_include_self`` the keys and
    values are ``cat(x, context)``, as that cross attention lets the class token attend to itself. Runs on SDPA
    on every backend but ``eager``. Constructor arguments: those of :class:`MultiHeadAttentionBase`.
    """

    def build_projections(self, dim: int, bias: bool) -> None:
        self.to_q = nn.Linear(dim, self.inner_dim, bias=bias)
        self.to_kv = nn.Linear(dim, self.inner_dim * 2, bias=bias)

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
    """Non-overlapping patches to tokens by a strided convolution (equal to vit-pytorch's rearrange + Linear).

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
            raise ValueError(f"img_size: expected a multiple of patch_size {self.patch_size}, got {self.img_size}")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_size(x, self.img_size)
        return to_tokens(self.proj(x))


def drop_path_rates(drop_path_rate: float, depth: int) -> list[float]:
    """Stochastic-depth rate of each of ``depth`` blocks, rising linearly from 0 to ``drop_path_rate``."""
    return [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]


def block_stack(
    depth: int,
    drop_path_rate: float,
    dim: int,
    num_heads: int,
    block_layer: Callable[..., nn.Module] = Block,
    attn_layer: Callable[..., nn.Module] | Sequence[Callable[..., nn.Module]] = Attention,
    **block_kwargs,
) -> nn.Sequential:
    """``depth`` blocks ``block_layer(dim, num_heads, drop_path=, attn_layer=, **block_kwargs)`` with stochastic-depth
    rates from ``drop_path_rates``. ``attn_layer`` is one attention constructor for every block or a sequence of one
    per block."""
    attn_layers = list(attn_layer) if isinstance(attn_layer, Sequence) else [attn_layer] * depth
    if len(attn_layers) != depth:
        raise ValueError(f"attn_layer: expected one attention per block ({depth}), got {len(attn_layers)}")
    rates = drop_path_rates(drop_path_rate, depth)
    return nn.Sequential(
        *(
            block_layer(dim, num_heads, drop_path=rate, attn_layer=layer, **block_kwargs)
            for rate, layer in zip(rates, attn_layers)
        )
    )


def check_stage_lengths(names: str, *per_stage: Sequence) -> None:
    """Raise ValueError unless the per-stage sequences ``per_stage`` (the arguments ``names``, comma-separated)
    have one length, naming them and their lengths."""
    lengths = [len(value) for value in per_stage]
    if len(set(lengths)) != 1:
        raise ValueError(f"{names}: expected one entry per stage each, got lengths {lengths}")


# --- the classifier interface and the ViT trunk ----------------------------------------------------------------


def make_head(dim: int, num_classes: int, layer: Callable[[int, int], nn.Module] = nn.Linear) -> nn.Module:
    """The classifier ``layer(dim, num_classes)`` (a Linear by default), or Identity for ``num_classes`` 0
    (features only)."""
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes: expected an int >= 0, got {num_classes!r}")
    return layer(dim, num_classes) if num_classes > 0 else nn.Identity()


def _rename_legacy_head_keys(module: ClassifierModel, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: the keys of a classifier's former names (``module.legacy_head_names``) under their
    present names. ``load_state_dict`` passes its own copy of the caller's state_dict."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        local = key[len(prefix) :]
        for old, new in module.legacy_head_names.items():
            if local == old or local.startswith(old + "."):
                state_dict[prefix + new + local[len(old) :]] = state_dict.pop(key)
                break


class ClassifierModel(nn.Module):
    """timm's classifier interface: ``forward`` is ``forward_head(forward_features(x))``, the classifier is
    ``head`` and, in a ``distilled`` model, ``head_dist`` (timm's ``levit.py`` and ``deit.py`` names).

    Subclasses set ``num_features`` (and ``distilled``), call ``reset_classifier(num_classes)`` to build the heads,
    define ``forward_features`` and, where its output is not already the heads' input, ``pool_features``: (B, F)
    for ``head``, or in a distilled model one (B, F) tensor both heads read or a pair (head's, head_dist's).
    ``new_head`` builds one head (a Linear on ``num_features`` by default). A distilled model returns both heads'
    logits when ``distilled_training`` and in training mode, their mean otherwise. ``legacy_head_names`` maps
    former classifier names to ``head`` / ``head_dist`` so that state_dicts saved under them still load.
    """

    legacy_head_names: dict[str, str] = {}
    distilled: bool = False
    distilled_training: bool = False
    num_classes: int
    num_features: int

    def __init__(self) -> None:
        super().__init__()
        if self.legacy_head_names:
            self.register_load_state_dict_pre_hook(_rename_legacy_head_keys)

    def new_head(self, num_classes: int) -> nn.Module:
        """One classifier for ``num_classes`` (0: Identity, features out)."""
        return make_head(self.num_features, num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head(s) with fresh ones for ``num_classes`` (0: no classifier, features out)."""
        self.num_classes = num_classes
        self.head = self.new_head(num_classes)
        self.head_dist = self.new_head(num_classes) if self.distilled else None

    def pool_features(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``forward_features``' output -> the heads' input (see the class docstring)."""
        return x

    def forward_head(
        self, x: torch.Tensor, pre_logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Features -> logits (B, num_classes), or with ``pre_logits`` the pooled (B, F) features (in a distilled
        model the mean of the two heads' inputs)."""
        x = self.pool_features(x)
        if not self.distilled:
            return x if pre_logits else self.head(x)
        x, x_dist = x if isinstance(x, tuple) else (x, x)
        if pre_logits:
            return (x + x_dist) / 2
        out, out_dist = self.head(x), self.head_dist(x_dist)
        if self.distilled_training and self.training:
            return out, out_dist
        return (out + out_dist) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))


class VisionTransformer(ClassifierModel):
    """The ViT trunk of DeiT, CaiT, DeepViT and T2T-ViT (timm's ``VisionTransformer``, with lucidrains/vit-pytorch's
    parameter names): ``to_patch_embedding``, a class token ``cls_token`` and, when ``distilled``, a
    ``distillation_token`` after it, a position embedding ``pos_embedding`` over those prefix tokens and the patches,
    ``dropout``, ``depth`` blocks (named ``blocks_name``, ``blocks`` unless a subclass says otherwise), the final
    ``norm`` and the heads on the class (and distillation) token.

    Args (timm's names and defaults, ViT-B/16):
        img_size, patch_size, in_chans, embed_dim: the patch embedding ``embed_layer(img_size=, patch_size=,
            in_chans=, embed_dim=)``, any module mapping images to (B, N, embed_dim) tokens with a ``num_patches``
            attribute.
        depth, num_heads, mlp_ratio, qkv_bias: the blocks, :func:`block_stack` of ``block_layer`` with
            ``attn_layer`` (one for every block or one per block); ``block_kwargs`` go to every block.
        drop_rate: dropout after the position embedding and in every block. attn_drop_rate, drop_path_rate: the
            blocks' attention dropout and stochastic depth.
        norm_layer: the blocks' and the final norm.
        pos_embed: None learns the position embedding; ``pos_embed(tokens, embed_dim)`` -> a fixed
            (1, tokens, embed_dim) table is kept as a non-persistent buffer instead (T2T-ViT).
        late_class_token: the position embedding covers the patches only and :meth:`embed_tokens` leaves the class
            token out; the subclass adds it later (CaiT).

    ``mlp_ratio`` and ``qkv_bias`` stay as attributes for subclasses that add blocks of their own. Subclasses call
    :meth:`init_weights` last, after adding their own modules.
    """

    legacy_head_names = {"mlp_head": "head", "distill_mlp": "head_dist"}
    blocks_name = "blocks"

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        distilled: bool = False,
        embed_layer: Callable[..., nn.Module] = PatchEmbed,
        norm_layer: Callable[[int], nn.Module] = layer_norm,
        pos_embed: Callable[[int, int], torch.Tensor] | None = None,
        late_class_token: bool = False,
        **block_kwargs,
    ) -> None:
        super().__init__()
        patch_embed = embed_layer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.embed_dim = self.num_features = embed_dim
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.distilled = self.distilled_training = distilled
        self.late_class_token = late_class_token
        self.num_prefix_tokens = 2 if distilled else 1
        self.to_patch_embedding = patch_embed
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.distillation_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        num_tokens = patch_embed.num_patches + (0 if late_class_token else self.num_prefix_tokens)
        if pos_embed is None:
            self.pos_embedding = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        else:
            table = pos_embed(num_tokens, embed_dim)
            if tuple(table.shape) != (1, num_tokens, embed_dim):
                raise ValueError(f"pos_embed: expected shape {(1, num_tokens, embed_dim)}, got {tuple(table.shape)}")
            self.register_buffer("pos_embedding", table, persistent=False)
        self.dropout = nn.Dropout(drop_rate)
        self.norm = norm_layer(embed_dim)
        self.reset_classifier(num_classes)
        blocks = block_stack(
            depth,
            drop_path_rate,
            embed_dim,
            num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            drop=drop_rate,
            attn_drop=attn_drop_rate,
            norm_layer=norm_layer,
            **block_kwargs,
        )
        self.add_module(self.blocks_name, blocks)

    def init_weights(self) -> None:
        """Truncated-normal tokens and learned position embedding, then :func:`trunc_normal_init` everywhere."""
        tokens = [self.cls_token] + ([self.distillation_token] if self.distilled else [])
        if isinstance(self.pos_embedding, nn.Parameter):
            tokens.insert(0, self.pos_embedding)
        for param in tokens:
            nn.init.trunc_normal_(param, std=INIT_STD)
        self.apply(trunc_normal_init)

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, [prefix +] patches, embed_dim) tokens with the position embedding, after
        dropout."""
        x = self.to_patch_embedding(x)
        if not self.late_class_token:
            prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
            if self.distilled:
                prefix.append(self.distillation_token.expand(x.shape[0], -1, -1))
            x = torch.cat((*prefix, x), dim=1)
        return self.dropout(x + self.pos_embedding)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, prefix + patches, embed_dim) normalised tokens."""
        return self.norm(getattr(self, self.blocks_name)(self.embed_tokens(x)))

    def pool_features(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Tokens -> the class token (B, embed_dim), with the distillation token in a distilled model."""
        return (x[:, 0], x[:, 1]) if self.distilled else x[:, 0]


# --- depthwise convolution with BatchNorm (ConvMixer, CvT, PiT, CoAtNet) -----------------------------------------

ACT_LAYERS: dict[str, Callable[[], nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU}


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


class DepthwiseConvBN(nn.Module):
    """Depthwise convolution, optional activation and optional BatchNorm, ``(+ residual)``, on the fused op.

    ``conv`` is an ``nn.Conv2d(in_channels, in_channels * multiplier, groups=in_channels)``; ``activation``
    ("gelu", "relu" or None) comes before the BatchNorm (ConvMixer) or, with ``act_after_norm``, after it
    (CoAtNet's MBConv). The children are named ``names`` = (conv, activation, BatchNorm), so that each family
    keeps its state_dict keys.

    On the ``eager`` backend it runs those plain modules. On the others it calls
    :func:`vitkern.ops.depthwise_conv2d` (a channel multiplier m as the input's channels each repeated m times):
    with an inference-mode BatchNorm in one call, the BatchNorm folded into the epilogue's scale and shift (or, when
    the activation follows it, into the weights and bias) and the residual added in the same pass; with batch
    statistics the conv and activation are fused and the BatchNorm and residual follow. Parameters are cast to x's
    dtype (autocast). x: (B, C, H, W) -> (B, C * multiplier, H', W').
    """

    def __init__(
        self,
        in_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = "same",
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        activation: str | None = None,
        norm: bool = True,
        act_after_norm: bool = False,
        multiplier: int = 1,
        names: tuple[str, str, str] = ("conv", "act", "bn"),
    ) -> None:
        super().__init__()
        if activation is not None and activation not in ACT_LAYERS:
            raise ValueError(f"activation: expected one of {(*ACT_LAYERS, None)}, got {activation!r}")
        self.activation = activation
        self.act_after_norm = act_after_norm
        self.multiplier = multiplier
        self.conv_name, self.act_name, self.norm_name = names
        out_channels = in_channels * multiplier
        self.add_module(
            self.conv_name,
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups=in_channels, bias=bias),
        )
        layers = []
        if activation is not None:
            layers.append((self.act_name, ACT_LAYERS[activation]()))
        if norm:
            layers.append((self.norm_name, nn.BatchNorm2d(out_channels)))
        if act_after_norm:
            layers.reverse()
        for name, layer in layers:
            self.add_module(name, layer)
        self.layer_names = (self.conv_name, *(name for name, _ in layers))
        self.has_norm = norm

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        """The plain modules in order, without the residual."""
        for name in self.layer_names:
            x = getattr(self, name)(x)
        return x

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if current_backend() == "eager":
            y = self.plain(x)
            return y if residual is None else y + residual
        conv = getattr(self, self.conv_name)
        if self.multiplier > 1:
            x = x.repeat_interleave(self.multiplier, dim=1)
        weight = conv.weight.to(x.dtype)
        bias = None if conv.bias is None else conv.bias.to(x.dtype)
        args = (conv.stride, conv.padding, conv.dilation)
        bn = getattr(self, self.norm_name) if self.has_norm else None
        if bn is not None and not bn_uses_batch_stats(bn):
            scale, shift = fold_batchnorm(bn)
            if not self.act_after_norm:
                return depthwise_conv2d(
                    x,
                    weight,
                    bias,
                    *args,
                    activation=self.activation,
                    scale=scale.to(x.dtype),
                    shift=shift.to(x.dtype),
                    residual=residual,
                )
            weight = (conv.weight * scale.view(-1, 1, 1, 1)).to(x.dtype)
            bias = (shift if conv.bias is None else conv.bias * scale + shift).to(x.dtype)
            return depthwise_conv2d(x, weight, bias, *args, activation=self.activation, residual=residual)
        if bn is None or not self.act_after_norm:
            y = depthwise_conv2d(x, weight, bias, *args, activation=self.activation)
            y = y if bn is None else bn(y)
        else:
            y = bn(depthwise_conv2d(x, weight, bias, *args))
            y = y if self.activation is None else getattr(self, self.act_name)(y)
        return y if residual is None else y + residual
