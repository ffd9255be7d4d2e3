"""What every family shares: state_dict keys, the classifier's legacy names, the override rule, DepthwiseConvBN.

- A few state_dict keys of each family's named configurations, with shapes counted by hand from the configuration.
- state_dicts saved under the former classifier names (``mlp_head``, ``distill_mlp``, ``fc``) load into ``head``
  and ``head_dist``, the caller's dict left as it was; other unexpected keys still fail a strict load.
- ``create_model(name, **overrides)``: every family takes an override of a value its configuration sets, and an
  unknown keyword raises TypeError naming it.
- :class:`DepthwiseConvBN` on the fused op (Triton interpreter) and on ``eager`` against ``F.conv2d``,
  ``F.batch_norm`` and the activation written out, output and every gradient, train and eval, with dilation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vitkern
from vitkern.models import create_model
from vitkern.models._layers import DepthwiseConvBN
from vitkern.models.coatnet import CoAtNet
from vitkern.testing import assert_close

# (key, shape) per configuration. DeiT-Ti: 192 wide, 16x16 patches of 224 -> 196 patches (+1 class, +1 distillation
# token), MLP 4x; CaiT-XXS-24: 4 heads, 24 blocks, class attention's to_kv 2 * 192; DeepViT-S: 64-channel stem,
# 8x8 projection to 396, 12 heads; T2T-ViT-7: the first token transformer reads 3 * 7^2 = 147-wide tokens into
# 3 * 64, the last split gives 64 * 3^2 = 576; CrossViT-9: 128/256 wide, 20x20 (+1) and 14x14 (+1) tokens;
# ConvMixer-768/32: 7x7 depthwise; CvT-13: 384-wide third stage of 10 blocks; PiT-Ti: 32-wide heads (2, 4, 8),
# a 27x27 grid ((224 - 16) / 8 + 1); CoAtNet-0: MBConv hidden 4 * 64, S3 on 14x14 with 384 / 32 heads and
# (2 * 14 - 1)^2 offsets, a bias-free head; LeViT-128S: 384-wide BatchNorm + Linear heads, 14x14 bias table.
PINNED_KEYS = {
    "deit_tiny_patch16_224": {
        "to_patch_embedding.proj.weight": (192, 3, 16, 16),
        "cls_token": (1, 1, 192),
        "pos_embedding": (1, 197, 192),
        "blocks.0.attn.to_qkv.weight": (576, 192),
        "blocks.11.mlp.fc2.weight": (192, 768),
        "norm.weight": (192,),
        "head.weight": (1000, 192),
    },
    "deit_tiny_distilled_patch16_224": {
        "distillation_token": (1, 1, 192),
        "pos_embedding": (1, 198, 192),
        "head_dist.weight": (1000, 192),
    },
    "cait_xxs24_224": {
        "patch_transformer.0.attn.proj_l.weight": (4, 4),
        "patch_transformer.23.ls1.scale": (192,),
        "cls_transformer.1.attn.to_kv.weight": (384, 192),
        "pos_embedding": (1, 196, 192),
        "head.weight": (1000, 192),
    },
    "deepvit_s": {
        "to_patch_embedding.conv1.weight": (64, 3, 7, 7),
        "to_patch_embedding.proj.weight": (396, 64, 8, 8),
        "blocks.15.attn.reattn_weights": (12, 12),
        "blocks.15.attn.reattn_norm.running_var": (12,),
        "head.weight": (1000, 396),
    },
    "t2t_vit_7": {
        "to_patch_embedding.transformers.0.attn.to_qkv.weight": (192, 147),
        "to_patch_embedding.project.weight": (256, 576),
        "head.weight": (1000, 256),
    },
    "crossvit_9_240": {
        "patch_embed.0.proj.weight": (128, 3, 12, 12),
        "pos_embedding.0": (1, 401, 128),
        "pos_embedding.1": (1, 197, 256),
        "blocks.0.fusion.0.0.attn.to_kv.weight": (512, 256),
        "head.0.weight": (1000, 128),
        "head.1.weight": (1000, 256),
    },
    "convmixer_768_32": {
        "patch_emb.conv.weight": (768, 3, 7, 7),
        "blocks.0.depth_wise_conv.weight": (768, 1, 7, 7),
        "blocks.0.norm1.running_var": (768,),
        "blocks.31.point_wise_conv.weight": (768, 768, 1, 1),
        "head.weight": (1000, 768),
    },
    "cvt_13": {
        "stages.2.blocks.9.attn.conv_proj_k.conv.weight": (384, 1, 3, 3),
        "stages.2.blocks.9.attn.conv_proj_k.bn.running_mean": (384,),
        "stages.2.cls_token": (1, 1, 384),
        "head.weight": (1000, 384),
    },
    "pit_ti_224": {
        "pos_embedding": (1, 64, 27, 27),
        "pools.0.downsample.weight": (128, 1, 3, 3),
        "pools.0.downsample.bias": (128,),
        "pools.1.cls_ff.weight": (256, 128),
        "transformers.2.blocks.3.attn.to_qkv.weight": (768, 256),
        "head.weight": (1000, 256),
    },
    "coatnet_0": {
        "s1.0.block.dw_conv.0.weight": (256, 1, 3, 3),
        "s1.0.block.dw_conv.1.running_var": (256,),
        "s3.0.attn.relative_bias_table": (729, 12),
        "pre_logits.0.weight": (768, 768),
        "head.weight": (1000, 768),
    },
    "levit_128s": {
        "backbone.0.layers.0.0.pos_bias.weight": (196, 4),
        "head.1.weight": (1000, 384),
        "head_dist.0.running_mean": (384,),
    },
}
# Keys that must not be there: T2T-ViT's sinusoid table is a non-persistent buffer, CoAtNet's head has no bias.
ABSENT_KEYS = {"t2t_vit_7": ("pos_embedding",), "coatnet_0": ("head.bias",)}


@pytest.mark.parametrize("name", sorted(PINNED_KEYS))
def test_state_dict_keys_are_pinned(name):
    with torch.device("meta"):
        state = create_model(name).state_dict()
    for key, shape in PINNED_KEYS[name].items():
        assert key in state, f"{name}: no {key}"
        assert tuple(state[key].shape) == shape, f"{name}: {key} {tuple(state[key].shape)} against {shape}"
    for key in ABSENT_KEYS.get(name, ()):
        assert key not in state, f"{name}: unexpected {key}"


def _tiny(family: str) -> nn.Module:
    if family == "coatnet":
        return CoAtNet(32, depth=(1, 1, 1, 1, 1), embed_dim=(4, 4, 8, 32, 32), num_classes=3, head_hidden_size=8)
    if family == "crossvit":
        return create_model(
            "crossvit_9_240",
            num_classes=3,
            img_size=16,
            img_scale=(1.0, 0.5),
            patch_size=(4, 8),
            embed_dim=(8, 16),
            depth=((1, 1, 0),),
            num_heads=(2, 2),
        )
    return create_model(
        "deit_tiny_distilled_patch16_224", num_classes=3, img_size=16, patch_size=8, embed_dim=8, depth=1, num_heads=2
    )


LEGACY_NAMES = {
    "deit": {"head": "mlp_head", "head_dist": "distill_mlp"},
    "crossvit": {"head": "mlp_head"},
    "coatnet": {"head": "fc"},
}


def _to_legacy(state: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
    legacy = {}
    for key, value in state.items():
        top, _, rest = key.partition(".")
        legacy[f"{names[top]}.{rest}" if top in names else key] = value
    return legacy


@pytest.mark.parametrize("family", sorted(LEGACY_NAMES))
def test_legacy_classifier_keys_load(family):
    source = _tiny(family)
    state = source.state_dict()
    legacy = _to_legacy(state, LEGACY_NAMES[family])
    assert set(legacy) != set(state)
    before = dict(legacy)
    target = _tiny(family)
    with torch.no_grad():
        for param in target.parameters():
            param.zero_()
    target.load_state_dict(legacy, strict=True)
    assert legacy.keys() == before.keys()
    for key, value in target.state_dict().items():
        assert torch.equal(value, state[key]), key

    wrapper = nn.Sequential(_tiny(family))
    wrapper.load_state_dict({f"0.{k}": v for k, v in legacy.items()}, strict=True)
    for key, value in wrapper[0].state_dict().items():
        assert torch.equal(value, state[key]), f"nested: {key}"

    with pytest.raises(RuntimeError, match="not_a_layer"):
        _tiny(family).load_state_dict({**legacy, "not_a_layer.weight": torch.zeros(1)}, strict=True)


# One override per family of a value its named configuration sets, and how to read it back.
OVERRIDES = {
    "deit_tiny_patch16_224": (dict(depth=2), lambda m: len(m.blocks) == 2),
    "cait_xxs24_224": (dict(depth=2), lambda m: len(m.patch_transformer) == 2),
    "deepvit_s": (dict(depth=2, re_attention=(False, True)), lambda m: len(m.blocks) == 2),
    "t2t_vit_7": (dict(depth=3), lambda m: len(m.blocks) == 3),
    "crossvit_9_240": (dict(depth=((1, 1, 0),)), lambda m: len(m.blocks) == 1),
    "convmixer_768_32": (
        dict(depth=3, activation="gelu"),
        lambda m: len(m.blocks) == 3 and isinstance(m.blocks[0].act1, nn.GELU),
    ),
    "cvt_13": (dict(depth=(1, 1, 1)), lambda m: [len(s.blocks) for s in m.stages] == [1, 1, 1]),
    "pit_ti_224": (dict(depth=(1, 1, 1)), lambda m: [len(t.blocks) for t in m.transformers] == [1, 1, 1]),
    "coatnet_0": (
        dict(depth=(1, 1, 1, 1, 1), head_hidden_size=None),
        lambda m: len(m.s3) == 1 and isinstance(m.pre_logits, nn.Identity),
    ),
    "levit_128s": (dict(depth=(1, 1, 1)), lambda m: len(m.backbone[0].layers) == 1),
}


@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_overrides_replace_configuration_values(name):
    overrides, check = OVERRIDES[name]
    with torch.device("meta"):
        model = create_model(name, num_classes=4, **overrides)
    assert check(model)
    assert model.num_classes == 4


@pytest.mark.parametrize(
    "name, keyword",
    [(name, "not_an_argument") for name in sorted(OVERRIDES)]
    + [
        ("coatnet_0", "image_size"),
        ("coatnet_0", "in_channels"),
        ("coatnet_0", "channels"),
        ("pit_ti_224", "heads"),
        ("pit_ti_224", "base_dims"),
        ("levit_128s", "dims"),
        ("levit_128s", "dim_key"),
        ("cvt_13", "depths"),
        ("convmixer_768_32", "dim"),
    ],
)
def test_unknown_override_raises_type_error_naming_it(name, keyword):
    with torch.device("meta"), pytest.raises(TypeError, match=keyword):
        create_model(name, **{keyword: 1})


ACTS = {None: lambda z: z, "gelu": F.gelu, "relu": F.relu}
# (constructor arguments, channel multiplier): ConvMixer's act-BN with a residual, CoAtNet's BN-act, CvT's strided
# BN without activation, PiT's multiplier-2 convolution without BatchNorm; dilation 2 in two of them.
VARIANTS = {
    "act_bn_residual": dict(kernel_size=3, padding="same", dilation=2, activation="gelu"),
    "bn_act": dict(kernel_size=3, padding=1, bias=False, activation="relu", act_after_norm=True),
    "bn_strided": dict(kernel_size=3, stride=2, padding=2, dilation=2, bias=False),
    "multiplier": dict(kernel_size=3, stride=2, padding=1, norm=False, multiplier=2),
}


def _oracle(layer: DepthwiseConvBN, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    conv = getattr(layer, layer.conv_name)
    y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, groups=x.shape[1])
    act = ACTS[layer.activation]
    if not layer.has_norm:
        return act(y)
    bn = getattr(layer, layer.norm_name)
    if not layer.act_after_norm:
        y = act(y)
    y = F.batch_norm(y, bn.running_mean.clone(), bn.running_var.clone(), bn.weight, bn.bias, bn.training, 0.0, bn.eps)
    if layer.act_after_norm:
        y = act(y)
    return y if residual is None else y + residual


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_depthwise_conv_bn_matches_the_formula(variant, mode, backend):
    gen = torch.Generator().manual_seed(0)
    layer = DepthwiseConvBN(3, **VARIANTS[variant]).train(mode == "train")
    with torch.no_grad():
        for param in layer.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
        for buffer_name in ("running_mean", "running_var"):
            for module in layer.modules():
                if isinstance(module, nn.BatchNorm2d):
                    getattr(module, buffer_name).copy_(torch.rand(module.num_features, generator=gen) + 0.5)
    x = torch.randn(1, 3, 7, 7, generator=gen, requires_grad=True)
    residual = x if variant == "act_bn_residual" else None
    x_before = x.detach().clone()
    params = [x, *layer.parameters()]

    expected = _oracle(layer, x, residual)
    weight = torch.randn(expected.shape, generator=gen)
    expected_grads = torch.autograd.grad((expected * weight).sum(), params)
    with vitkern.backend(backend):
        out = layer(x, residual=residual)
    grads = torch.autograd.grad((out * weight).sum(), params)
    assert torch.equal(x.detach(), x_before)
    assert_close(out, expected, name=f"{variant} {mode} output")
    for (name, _), grad, ref in zip([("x", x), *layer.named_parameters()], grads, expected_grads):
        assert_close(grad, ref, name=f"{variant} {mode} grad {name}")


def test_depthwise_conv_bn_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation.*'swish'"):
        DepthwiseConvBN(4, 3, activation="swish")
