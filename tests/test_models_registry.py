"""``vitkern.models.create_model`` / ``list_models`` / ``register_model``: the timm-style registry."""

from __future__ import annotations

import fnmatch

import pytest
import torch
import torch.nn as nn

from vitkern.models import FAMILIES, create_model, list_models, register_model

FAMILY_NAMES = ("coatnet", "convmixer", "deepvit", "deit", "cait", "t2t_vit", "crossvit", "pit", "levit", "cvt")
# Each named configuration the issue asks for, by family.
EXPECTED = {
    "coatnet": [f"coatnet_{i}" for i in range(5)],
    "convmixer": ["convmixer_1536_20", "convmixer_768_32", "convmixer_1024_20_ks9_p14"],
    "deepvit": ["deepvit_s", "deepvit_l"],
    "deit": [
        "deit_tiny_patch16_224",
        "deit_small_patch16_224",
        "deit_base_patch16_224",
        "deit_tiny_distilled_patch16_224",
    ],
    "cait": ["cait_xxs24_224", "cait_xxs36_224", "cait_s24_224"],
    "t2t_vit": [f"t2t_vit_{n}" for n in (7, 10, 12, 14, 19, 24)],
    "crossvit": ["crossvit_9_240", "crossvit_15_240", "crossvit_18_240"],
    "pit": ["pit_ti_224", "pit_xs_224", "pit_s_224", "pit_b_224"],
    "levit": ["levit_128s", "levit_128", "levit_192", "levit_256", "levit_384"],
    "cvt": ["cvt_13", "cvt_21"],
}


def test_every_family_is_registered():
    assert set(FAMILIES) == set(FAMILY_NAMES)
    names = list_models()
    for family, configs in EXPECTED.items():
        missing = [c for c in configs if c not in names]
        assert not missing, f"{family}: configurations {missing} are not registered"


def test_list_models_is_sorted_and_filters_by_glob():
    names = list_models()
    assert names == sorted(names)
    assert len(names) == len(set(names))
    deit = list_models("deit_*")
    assert deit == sorted(n for n in names if fnmatch.fnmatch(n, "deit_*"))
    assert set(EXPECTED["deit"]) <= set(deit)
    assert list_models("no_such_model_*") == []


def test_unknown_name_raises_value_error_naming_it():
    with pytest.raises(ValueError, match="'vit_gigantic'"):
        create_model("vit_gigantic")


@pytest.mark.parametrize("name", [["deit_tiny_patch16_224"], None, 3])
def test_non_string_name_raises_type_error_naming_it(name):
    with pytest.raises(TypeError, match="name: expected a str"):
        create_model(name)


def test_registering_a_name_twice_raises():
    def deit_tiny_patch16_224(num_classes: int = 1000) -> nn.Module:
        return nn.Identity()

    with pytest.raises(ValueError, match="deit_tiny_patch16_224"):
        register_model(deit_tiny_patch16_224)
    with torch.device("meta"):
        model = create_model("deit_tiny_patch16_224")
    assert not isinstance(model, nn.Identity)


def test_create_model_passes_num_classes_img_size_and_kwargs():
    model = create_model(
        "deit_tiny_patch16_224", num_classes=7, img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2
    ).eval()
    assert model.num_classes == 7
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    assert len(model.blocks) == 1


def test_create_model_defaults_to_native_resolution():
    with torch.device("meta"):
        deit = create_model("deit_small_patch16_224")
        crossvit = create_model("crossvit_9_240")
    assert deit.to_patch_embedding.img_size == (224, 224)
    assert deit.num_classes == 1000
    assert crossvit.img_size == 240


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_every_family_follows_the_timm_model_interface(family):
    with torch.device("meta"):
        model = create_model(EXPECTED[family][0])
    assert isinstance(model, nn.Module)
    assert model.num_classes == 1000
    for method in ("forward_features", "forward_head", "reset_classifier"):
        assert callable(getattr(model, method, None)), f"{family}: no {method}"
