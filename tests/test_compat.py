"""kernels/_compat.py: the one place that tells Triton releases apart, and the launch rule it switches."""

from __future__ import annotations

import pytest
import torch

from vitkern.kernels import _compat
from vitkern.kernels import attention as attention_kernels
from vitkern.kernels import depthwise_conv as depthwise_kernels


@pytest.mark.parametrize(
    "version, release",
    [("3.6.0", (3, 6)), ("3.8.0", (3, 8)), ("3.8.0+git1234", (3, 8)), ("3.10.1", (3, 10)), ("3.7.0rc1", (3, 7))],
)
def test_release_is_read_from_the_version_string(version, release):
    assert _compat._release(version) == release


def test_narrow_tiles_before_triton_3_8_only():
    assert _compat.NARROW_TILES == (_compat.TRITON_RELEASE < (3, 8))


@pytest.mark.parametrize("narrow", [False, True])
def test_launch_configs_follow_the_rule(monkeypatch, narrow):
    monkeypatch.setattr(attention_kernels, "NARROW_TILES", narrow)
    fwd = attention_kernels._fwd_config(49, 49, 32, 32, torch.float16)
    assert (fwd["BLOCK_M"], fwd["num_warps"]) == ((32, 4) if narrow else (64, 8))
    fwd_wide = attention_kernels._fwd_config(196, 196, 128, 128, torch.float16)
    assert (fwd_wide["BLOCK_M"], fwd_wide["num_warps"]) == (32, 8 if narrow else 4)
    bwd = attention_kernels._bwd_config(49, 49, 32, 32, torch.float32)
    assert bwd["num_warps"] == (4 if narrow else 2)
    table = attention_kernels._table_config(64, 64)
    assert table["BLOCK_G"] == (32 if narrow else 64)
    # the depthwise epilogue backward takes its narrow channels_last tile on every triton
    assert depthwise_kernels.EPILOGUE_BWD_TILE[True][0] == 16
