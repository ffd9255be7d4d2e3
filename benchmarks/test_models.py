"""Images per second of whole models, plain PyTorch against fused (`pytest benchmarks`).

coatnet_0, convmixer_768_32, levit_128s, deit_tiny_patch16_224 and cait_xxs24_224 at their native resolution (224),
inference (eval, no grad) and one training step (forward, cross-entropy, backward, SGD step), each on backend
``eager`` (the plain-PyTorch layers and reference ops) and ``auto`` (the fused path: on CUDA tensors the GPU kernels
and SDPA, on CPU tensors the CPU path). ``extra_info["images_per_s"]`` is the batch over the mean time of a round.

CPU: batch 2 and few rounds, so that the file runs in a few minutes on 2 cores (the Triton interpreter is a
correctness tool, not a speed measurement, so it is not benchmarked). CUDA: batch 64 under bf16 autocast, as
models are trained and served there. Timings are never asserted.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import vitkern
from vitkern.models import create_model

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
BATCH = 64 if ON_CUDA else 2
ROUNDS = 10 if ON_CUDA else 2
WARMUP_ROUNDS = 3 if ON_CUDA else 1
IMG = 224
NUM_CLASSES = 1000
LEARNING_RATE = 1e-3

MODELS = ("coatnet_0", "convmixer_768_32", "levit_128s", "deit_tiny_patch16_224", "cait_xxs24_224")
BACKENDS = ("eager", "auto")


def _autocast() -> contextlib.AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if ON_CUDA else contextlib.nullcontext()


def _synchronize() -> None:
    if ON_CUDA:
        torch.cuda.synchronize()


def _logits(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Distilled models return (class, distillation) logits in distillation training: the class logits."""
    return out[0] if isinstance(out, tuple) else out


def _run_benchmark(benchmark, step, backend: str, name: str, mode: str) -> None:
    def timed() -> None:
        with vitkern.backend(backend), _autocast():
            step()
        _synchronize()

    benchmark.group = f"{name} {mode}"
    benchmark.extra_info.update(model=name, mode=mode, backend=backend, batch=BATCH, device=DEVICE.type)
    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    benchmark.extra_info["images_per_s"] = BATCH / benchmark.stats.stats.mean


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODELS)
def test_inference(benchmark, name, backend):
    model = create_model(name, num_classes=NUM_CLASSES).to(DEVICE).eval()
    x = torch.randn(BATCH, 3, IMG, IMG, device=DEVICE)

    @torch.no_grad()
    def step() -> None:
        model(x)

    _run_benchmark(benchmark, step, backend, name, "inference")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODELS)
def test_training_step(benchmark, name, backend):
    model = create_model(name, num_classes=NUM_CLASSES).to(DEVICE).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    x = torch.randn(BATCH, 3, IMG, IMG, device=DEVICE)
    target = torch.randint(0, NUM_CLASSES, (BATCH,), device=DEVICE)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(_logits(model(x)).float(), target)
        loss.backward()
        optimizer.step()

    _run_benchmark(benchmark, step, backend, name, "training step")
