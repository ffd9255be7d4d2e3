"""timm models, unpatched against ``vitkern.patch``-ed (`pytest benchmarks`): images per second.

levit_128s, coatnet_0_rw_224, maxvit_tiny_rw_224, maxvit_tiny_tf_224, swin_tiny_patch4_window7_224, convnext_tiny
and convmixer_768_32 with random weights (``pretrained=False``, nothing downloads) at 224, inference (eval, no
grad) and one training step (forward, cross-entropy, backward, SGD step). ``extra_info["images_per_s"]`` is the
batch over the mean time of a round.

Batch, rounds and the timed steps are ``_common.py``'s: batch 2 and few rounds on CPU, where the patched model runs
on the CPU path (``auto``); batch 64 under bf16 autocast on CUDA, where the patched attention runs the GPU kernels.
Timings are never asserted.
"""

from __future__ import annotations

import os

import pytest
import torch.nn as nn
from _common import DEVICE, NUM_CLASSES, inference_step, run_benchmark, training_step

import vitkern

os.environ.setdefault("HF_HUB_OFFLINE", "1")
timm = pytest.importorskip("timm", reason="benchmarks/test_timm.py runs timm models: pip install timm")

MODELS = (
    "levit_128s",
    "coatnet_0_rw_224",
    "maxvit_tiny_rw_224",
    "maxvit_tiny_tf_224",
    "swin_tiny_patch4_window7_224",
    "convnext_tiny",
    "convmixer_768_32",
)
VARIANTS = ("unpatched", "patched")


def _model(name: str, variant: str, train: bool) -> nn.Module:
    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES).to(DEVICE).train(train)
    return vitkern.patch(model) if variant == "patched" else model


def _run(benchmark, step, variant: str, name: str, mode: str) -> None:
    run_benchmark(benchmark, step, f"timm {name} {mode}", model=name, mode=mode, variant=variant)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", MODELS)
def test_timm_inference(benchmark, name, variant):
    _run(benchmark, inference_step(_model(name, variant, train=False)), variant, name, "inference")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", MODELS)
def test_timm_training_step(benchmark, name, variant):
    _run(benchmark, training_step(_model(name, variant, train=True)), variant, name, "training step")
