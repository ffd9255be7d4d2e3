"""What the whole-model benchmarks share (``test_models.py``, ``test_timm.py``): device, batch and rounds, the
inference and training steps, and the timed run.

CPU: batch 2 and few rounds, so that a file runs in minutes on 2 cores. CUDA: batch 64 under bf16 autocast, as
models are trained and served there. ``extra_info["images_per_s"]`` is the batch over the mean time of a round.
Timings are never asserted.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
BATCH = 64 if ON_CUDA else 2
ROUNDS = 10 if ON_CUDA else 2
WARMUP_ROUNDS = 3 if ON_CUDA else 1
IMG = 224
NUM_CLASSES = 1000
LEARNING_RATE = 1e-3


def autocast() -> contextlib.AbstractContextManager:
    return torch.autocast("cuda", dtype=torch.bfloat16) if ON_CUDA else contextlib.nullcontext()


def synchronize() -> None:
    if ON_CUDA:
        torch.cuda.synchronize()


def logits(out: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Distilled models return (class, distillation) logits in distillation training: the class logits."""
    return out[0] if isinstance(out, tuple) else out


def inference_step(model: nn.Module) -> Callable[[], None]:
    """One forward of a (BATCH, 3, IMG, IMG) random batch, without grad."""
    x = torch.randn(BATCH, 3, IMG, IMG, device=DEVICE)

    @torch.no_grad()
    def step() -> None:
        model(x)

    return step


def training_step(model: nn.Module) -> Callable[[], None]:
    """One SGD step on a random batch and random labels: forward, cross-entropy, backward, update."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    x = torch.randn(BATCH, 3, IMG, IMG, device=DEVICE)
    target = torch.randint(0, NUM_CLASSES, (BATCH,), device=DEVICE)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(logits(model(x)).float(), target)
        loss.backward()
        optimizer.step()

    return step


def run_benchmark(
    benchmark,
    step: Callable[[], None],
    group: str,
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    **info,
) -> None:
    """Time ``step`` under ``context()`` and autocast in ``group``; ``info`` (model, mode, ...) goes to
    ``extra_info`` with the batch, the device and the images per second."""

    def timed() -> None:
        with context(), autocast():
            step()
        synchronize()

    benchmark.group = group
    benchmark.extra_info.update(**info, batch=BATCH, device=DEVICE.type)
    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    benchmark.extra_info["images_per_s"] = BATCH / benchmark.stats.stats.mean
