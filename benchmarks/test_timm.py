"""timm models, unpatched against ``vitkern.patch``-ed (`pytest benchmarks`): images per second.

levit_128s, coatnet_0_rw_224, maxvit_tiny_rw_224, maxvit_tiny_tf_224, swin_tiny_patch4_window7_224, convnext_tiny
and convmixer_768_32 with random weights (``pretrained=False``, nothing downloads) at 224, inference (eval, no
grad) and one training step (forward, cross-entropy, backward, SGD step). ``extra_info["images_per_s"]`` is the
batch over the mean time of a round.

CPU: batch 2 and few rounds, so that the file runs in minutes on 2 cores; the patched model runs on the CPU path
(``auto``). CUDA: batch 64 under bf16 autocast, where the patched attention runs the GPU kernels. Timings are never
asserted.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

import vitkern

os.environ.setdefault("HF_HUB_OFFLINE", "1")
timm = pytest.importorskip("timm", reason="benchmarks/test_timm.py runs timm models: pip install timm")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
BATCH = 64 if ON_CUDA else 2
ROUNDS = 10 if ON_CUDA else 2
WARMUP_ROUNDS = 3 if ON_CUDA else 1
IMG = 224
NUM_CLASSES = 1000
LEARNING_RATE = 1e-3

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


def _autocast() -> contextlib.AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if ON_CUDA else contextlib.nullcontext()


def _synchronize() -> None:
    if ON_CUDA:
        torch.cuda.synchronize()


def _model(name: str, variant: str, train: bool) -> torch.nn.Module:
    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES).to(DEVICE).train(train)
    return vitkern.patch(model) if variant == "patched" else model


def _run_benchmark(benchmark, step, variant: str, name: str, mode: str) -> None:
    def timed() -> None:
        with _autocast():
            step()
        _synchronize()

    benchmark.group = f"timm {name} {mode}"
    benchmark.extra_info.update(model=name, mode=mode, variant=variant, batch=BATCH, device=DEVICE.type)
    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    benchmark.extra_info["images_per_s"] = BATCH / benchmark.stats.stats.mean


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", MODELS)
def test_timm_inference(benchmark, name, variant):
    model = _model(name, variant, train=False)
    x = torch.randn(BATCH, 3, IMG, IMG, device=DEVICE)

    @torch.no_grad()
    def step() -> None:
        model(x)

    _run_benchmark(benchmark, step, variant, name, "inference")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", MODELS)
def test_timm_training_step(benchmark, name, variant):
    model = _model(name, variant, train=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    x = torch.randn(BATCH, 3, IMG, IMG, device=DEVICE)
    target = torch.randint(0, NUM_CLASSES, (BATCH,), device=DEVICE)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x).float(), target)
        loss.backward()
        optimizer.step()

    _run_benchmark(benchmark, step, variant, name, "training step")
