"""``vitkern.patch(model)``: the hot spots of a timm model on the fused ops, everything else left as it was.

Patching rebinds ``forward`` on each matching module instance (``module.forward = types.MethodType(fused, module)``),
as Liger-Kernel's ``src/liger_kernel/transformers/monkey_patch.py`` (linkedin/Liger-Kernel) does: no parameter,
buffer or state_dict key changes, and the previous forward is kept in a registry keyed by module, so
:func:`unpatch` restores it and :func:`patched` lists what runs where. Modules are matched by class identity on
timm's classes (timm is imported only when a model is patched, and not needed for the depthwise convolutions).

A fused forward checks at call time what its op cannot cover (attention dropout in training, an unbatched input or
one whose dtype differs from the conv weight's, as under autocast, a BatchNorm in training mode) and runs the
module's own forward for that call. Attention tables and biases are cast to the dtype of q (a no-op outside
autocast).

torch.compile: patch first, then compile (the compiled graph traces the fused forwards and the custom ops). A model
that is already compiled (``torch.compile(model)`` or ``model.compile()``) is refused with a TypeError: the compiled
code would keep running the forwards it traced.
"""

from __future__ import annotations

import importlib.util
import types
import weakref
from collections.abc import Callable

import torch
import torch.nn as nn

from vitkern.kernels.contract import MAX_KERNEL
from vitkern.ops.attention import levit_attention, rel_pos_attention
from vitkern.ops.depthwise_conv import depthwise_conv2d

DEPTHWISE_CONV = "vitkern.ops.depthwise_conv2d"
REL_POS_ATTENTION = "vitkern.ops.rel_pos_attention"
LEVIT_ATTENTION = "vitkern.ops.levit_attention"
# ConvMixer's residual block (timm/models/convmixer.py ``Residual(Sequential(dw conv, act, BatchNorm2d))``)
FUSED_CONVMIXER = "vitkern.ops.depthwise_conv2d (activation, eval-mode BatchNorm and residual in the epilogue)"
FUSABLE_ACTIVATIONS = {nn.GELU: "gelu", nn.ReLU: "relu"}

# module -> (the instance's own ``forward`` attribute before patching, or None; what it runs now)
_REGISTRY: weakref.WeakKeyDictionary[nn.Module, tuple[Callable | None, str]] = weakref.WeakKeyDictionary()


# --- depthwise convolution ------------------------------------------------------------------------------------


def _is_depthwise(conv: nn.Module) -> bool:
    """A plain ``nn.Conv2d`` (not a subclass with its own forward, such as timm's Conv2dSame) whose every group is
    one channel, zero-padded, with a kernel the op takes."""
    return (
        type(conv) is nn.Conv2d
        and conv.groups == conv.in_channels == conv.out_channels
        and conv.padding_mode == "zeros"
        and all(1 <= size <= MAX_KERNEL for size in conv.kernel_size)
    )


def _conv_covered(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.dtype == conv.weight.dtype


def _depthwise_conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if not _conv_covered(self, x):
        return _original(self)(x)
    return depthwise_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)


def _convmixer_parts(residual: nn.Module) -> tuple[nn.Conv2d, nn.Module, nn.BatchNorm2d] | None:
    """(conv, activation, norm) of a ConvMixer residual block whose body is exactly a depthwise conv, a GELU (erf)
    or ReLU and a BatchNorm2d, else None."""
    body = getattr(residual, "fn", None)
    if type(body) is not nn.Sequential or len(body) != 3:
        return None
    conv, act, norm = body
    if not _is_depthwise(conv) or conv.stride != (1, 1) or type(norm) is not nn.BatchNorm2d:
        return None
    if type(act) not in FUSABLE_ACTIVATIONS or getattr(act, "approximate", "none") != "none":
        return None
    return conv, act, norm


def _convmixer_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm(act(conv(x))) + x`` in one depthwise_conv2d call, the eval-mode BatchNorm folded into the epilogue's
    per-channel scale and shift. Training-mode (or statistics-free) norms and hooked sub-modules run the block's
    own forward."""
    conv, act, norm = self.fn
    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in (self.fn, conv, act, norm))
    if norm.training or norm.running_var is None or hooked or not _conv_covered(conv, x):
        return _original(self)(x)
    scale = torch.rsqrt(norm.running_var + norm.eps)
    shift = -norm.running_mean * scale
    if norm.weight is not None:
        scale = scale * norm.weight
        shift = shift * norm.weight + norm.bias
    return depthwise_conv2d(
        x,
        conv.weight,
        conv.bias,
        conv.stride,
        conv.padding,
        conv.dilation,
        activation=FUSABLE_ACTIVATIONS[type(act)],
        scale=scale.to(x.dtype),
        shift=shift.to(x.dtype),
        residual=x,
    )


# --- attention ------------------------------------------------------------------------------------------------


def _dropout_active(module: nn.Module) -> bool:
    return module.training and module.attn_drop.p > 0


def _rel_pos_table(rel_pos: nn.Module, timm_layers: types.ModuleType) -> torch.Tensor:
    """The ((2Wh-1)(2Ww-1), heads) table of a RelPosBias or RelPosBiasTf. RelPosBiasTf's (heads, 2Wh-1, 2Ww-1)
    table is indexed by key minus query (timm/layers/pos_embed_rel.py ``generate_lookup_tensor``), vitkern's by
    query minus key: flipped on both offset axes (a copy of the table, not of the (N, N) bias) it is read through a
    transposed view."""
    table = rel_pos.relative_position_bias_table
    if isinstance(rel_pos, timm_layers.RelPosBiasTf):
        return table.flip(1, 2).flatten(1).t()
    return table


def _maxxvit_attention(module, q, k, v, timm_layers):
    """q, k, v (B, heads, N, dim_head) through the module's relative-position table."""
    rel_pos = module.rel_pos
    table = _rel_pos_table(rel_pos, timm_layers)
    return rel_pos_attention(q, k, v, table.to(q.dtype), tuple(rel_pos.window_size), module.scale)


def _attention2d_forward(self, x: torch.Tensor, shared_rel_pos: torch.Tensor | None = None) -> torch.Tensor:
    """timm/models/maxxvit.py ``Attention2d.forward`` (NCHW) with the attention on rel_pos_attention."""
    if _dropout_active(self):
        return _original(self)(x, shared_rel_pos)
    batch, _, height, width = x.shape
    if self.head_first:
        q, k, v = self.qkv(x).view(batch, self.num_heads, self.dim_head * 3, -1).chunk(3, dim=2)
    else:
        q, k, v = self.qkv(x).reshape(batch, 3, self.num_heads, self.dim_head, -1).unbind(1)
    out = _maxxvit_attention(self, q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2), _timm_layers())
    x = out.transpose(-1, -2).reshape(batch, -1, height, width)
    return self.proj_drop(self.proj(x))


def _attention_cl_forward(self, x: torch.Tensor, shared_rel_pos: torch.Tensor | None = None) -> torch.Tensor:
    """timm/models/maxxvit.py ``AttentionCl.forward`` (channels last) with the attention on rel_pos_attention."""
    if _dropout_active(self):
        return _original(self)(x, shared_rel_pos)
    batch = x.shape[0]
    restore_shape = x.shape[:-1]
    if self.head_first:
        q, k, v = self.qkv(x).view(batch, -1, self.num_heads, self.dim_head * 3).transpose(1, 2).chunk(3, dim=3)
    else:
        q, k, v = self.qkv(x).reshape(batch, -1, 3, self.num_heads, self.dim_head).transpose(1, 3).unbind(2)
    out = _maxxvit_attention(self, q, k, v, _timm_layers())
    x = out.transpose(1, 2).reshape(restore_shape + (-1,))
    return self.proj_drop(self.proj(x))


def _window_attention_forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """timm/models/swin_transformer.py ``WindowAttention.forward`` with the attention, shifted-window mask included,
    on rel_pos_attention."""
    if _dropout_active(self):
        return _original(self)(x, mask)
    batch_windows, tokens, _ = x.shape
    q, k, v = self.qkv(x).reshape(batch_windows, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    if mask is not None:
        mask = mask.to(q.dtype).contiguous()
    out = rel_pos_attention(
        q, k, v, self.relative_position_bias_table.to(q.dtype), tuple(self.window_size), self.scale, mask=mask
    )
    x = out.transpose(1, 2).reshape(batch_windows, tokens, -1)
    return self.proj_drop(self.proj(x))


def _levit_attend(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stride: int) -> torch.Tensor:
    """q, k, v (B, heads, N, D) through levit_attention with the module's ``attention_biases``, resolution and
    scale."""
    biases = module.attention_biases.to(q.dtype)
    return levit_attention(q, k, v, biases, module.resolution[0], stride, module.scale)


def _levit_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm/models/levit.py ``Attention.forward`` with the attention on levit_attention: the biases are read from
    ``attention_biases`` inside the kernel, so timm's eval-mode gathered-bias cache is neither read nor filled."""
    if self.use_conv:
        batch, _, height, width = x.shape
        q, k, v = (
            self.qkv(x)
            .view(batch, self.num_heads, -1, height * width)
            .split([self.key_dim, self.key_dim, self.val_dim], dim=2)
        )
        out = _levit_attend(self, q.transpose(-2, -1), k.transpose(-2, -1), v.transpose(-2, -1), 1)
        x = out.transpose(-2, -1).reshape(batch, -1, height, width)
    else:
        batch, tokens, _ = x.shape
        q, k, v = (
            self.qkv(x).view(batch, tokens, self.num_heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        )
        out = _levit_attend(self, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 1)
        x = out.transpose(1, 2).reshape(batch, tokens, self.val_attn_dim)
    return self.proj(x)


def _levit_downsample_forward(self, x: torch.Tensor) -> torch.Tensor:
    """timm/models/levit.py ``AttentionDownsample.forward``: queries on the stride grid, levit_attention's shrink
    form."""
    if self.use_conv:
        batch, _, height, width = x.shape
        out_h, out_w = (height - 1) // self.stride + 1, (width - 1) // self.stride + 1
        k, v = self.kv(x).view(batch, self.num_heads, -1, height * width).split([self.key_dim, self.val_dim], dim=2)
        q = self.q(x).view(batch, self.num_heads, self.key_dim, -1)
        out = _levit_attend(self, q.transpose(-2, -1), k.transpose(-2, -1), v.transpose(-2, -1), self.stride)
        x = out.transpose(-2, -1).reshape(batch, self.val_attn_dim, out_h, out_w)
    else:
        batch, tokens, _ = x.shape
        k, v = self.kv(x).view(batch, tokens, self.num_heads, -1).split([self.key_dim, self.val_dim], dim=3)
        q = self.q(x).view(batch, -1, self.num_heads, self.key_dim).transpose(1, 2)
        out = _levit_attend(self, q, k.transpose(1, 2), v.transpose(1, 2), self.stride)
        x = out.transpose(1, 2).reshape(batch, -1, self.val_attn_dim)
    return self.proj(x)


# --- what gets patched ----------------------------------------------------------------------------------------


def _timm_layers() -> types.ModuleType:
    import timm.layers

    return timm.layers


def _maxxvit_covered(module: nn.Module, timm_layers: types.ModuleType) -> bool:
    """A fixed relative-position table without prefix tokens (RelPosMlp generates its bias with an MLP; a module
    without rel_pos takes the block's shared bias)."""
    rel_pos = module.rel_pos
    if type(rel_pos) is timm_layers.RelPosBias:
        return rel_pos.prefix_tokens == 0
    return type(rel_pos) is timm_layers.RelPosBiasTf


def _levit_covered(module: nn.Module) -> bool:
    """A square resolution (levit_attention's grid is R x R)."""
    return module.resolution[0] == module.resolution[1]


def _timm_installed() -> bool:
    return importlib.util.find_spec("timm") is not None


def _attention_rules() -> list[tuple[type, Callable[[nn.Module], bool], Callable, str]]:
    """(timm class, whether an instance is covered, fused forward, what it runs) for every attention module; none
    without timm (no model then holds its classes)."""
    if not _timm_installed():
        return []
    from timm.models import levit, maxxvit, swin_transformer

    timm_layers = _timm_layers()
    maxxvit_covered = lambda module: _maxxvit_covered(module, timm_layers)  # noqa: E731
    return [
        (levit.Attention, _levit_covered, _levit_attention_forward, LEVIT_ATTENTION),
        (levit.AttentionDownsample, _levit_covered, _levit_downsample_forward, LEVIT_ATTENTION),
        (maxxvit.Attention2d, maxxvit_covered, _attention2d_forward, REL_POS_ATTENTION),
        (maxxvit.AttentionCl, maxxvit_covered, _attention_cl_forward, REL_POS_ATTENTION),
        (swin_transformer.WindowAttention, lambda module: True, _window_attention_forward, REL_POS_ATTENTION),
    ]


def _original(module: nn.Module) -> Callable:
    """The forward the module ran before patching (the class's for a deep copy of a patched module, which the
    registry does not hold)."""
    own = _REGISTRY.get(module, (None,))[0]
    return own if own is not None else types.MethodType(type(module).forward, module)


def _rebind(module: nn.Module, forward: Callable, what: str) -> None:
    if module in _REGISTRY:
        return
    _REGISTRY[module] = (module.__dict__.get("forward"), what)
    module.forward = types.MethodType(forward, module)


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) or getattr(model, "_compiled_call_impl", None):
        raise TypeError(
            "model: expected a model that is not compiled yet, got one compiled with torch.compile; call "
            "vitkern.patch(model) first, then torch.compile"
        )


def patch(model: nn.Module, *, attention: bool = True, depthwise_conv: bool = True) -> nn.Module:
    """Put a timm model's hot spots on the fused ops, in place; returns ``model``.

    Args:
        model: any nn.Module (timm models are what it knows); not compiled yet.
        attention: timm's LeViT ``Attention`` / ``AttentionDownsample`` on levit_attention, MaxxViT / CoAtNet
            ``Attention2d`` / ``AttentionCl`` with ``RelPosBias`` or ``RelPosBiasTf`` and Swin ``WindowAttention``
            on rel_pos_attention.
        depthwise_conv: every depthwise ``nn.Conv2d`` on depthwise_conv2d; ConvMixer's residual block (conv,
            activation, BatchNorm, skip) in one call with the BatchNorm in the epilogue while it is in eval mode.

    Parameters, buffers and state_dict keys are untouched; patching twice changes nothing.
    """
    _check_model(model)
    for name, value in (("attention", attention), ("depthwise_conv", depthwise_conv)):
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    rules = _attention_rules() if attention else []
    convmixer_residual = None
    if depthwise_conv and _timm_installed():
        from timm.models import convmixer

        convmixer_residual = convmixer.Residual
    for module in model.modules():
        for cls, covered, forward, what in rules:
            if type(module) is cls and covered(module):
                _rebind(module, forward, what)
        if not depthwise_conv:
            continue
        if _is_depthwise(module):
            _rebind(module, _depthwise_conv_forward, DEPTHWISE_CONV)
        elif type(module) is convmixer_residual and _convmixer_parts(module) is not None:
            _rebind(module, _convmixer_forward, FUSED_CONVMIXER)
    return model


def patched(model: nn.Module) -> list[tuple[str, str]]:
    """(qualified module name, what it runs now) for every patched module of ``model``, in module order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    return [(name, _REGISTRY[module][1]) for name, module in model.named_modules() if module in _REGISTRY]


def unpatch(model: nn.Module) -> nn.Module:
    """Restore every forward :func:`patch` replaced in ``model``; returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        if module not in _REGISTRY:
            continue
        own, _ = _REGISTRY.pop(module)
        if own is None:
            del module.forward
        else:
            module.forward = own
    return model
