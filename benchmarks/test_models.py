"""Images per second of whole models, plain PyTorch against fused (`pytest benchmarks`).

coatnet_0, convmixer_768_32, levit_128s, deit_tiny_patch16_224 and cait_xxs24_224 at their native resolution (224),
inference (eval, no grad) and one training step (forward, cross-entropy, backward, SGD step), each on backend
``eager`` (the plain-PyTorch layers and reference ops) and ``auto`` (the fused path: on CUDA tensors the GPU kernels
and SDPA, on CPU tensors the CPU path). ``extra_info["images_per_s"]`` is the batch over the mean time of a round.

Batch, rounds and the timed steps are ``_common.py``'s: batch 2 and few rounds on CPU (the Triton interpreter is a
correctness tool, not a speed measurement, so it is not benchmarked), batch 64 under bf16 autocast on CUDA. Timings
are never asserted.
"""

from __future__ import annotations

from functools import partial

import pytest
from _common import DEVICE, NUM_CLASSES, inference_step, run_benchmark, training_step

import vitkern
from vitkern.models import create_model

MODELS = ("coatnet_0", "convmixer_768_32", "levit_128s", "deit_tiny_patch16_224", "cait_xxs24_224")
BACKENDS = ("eager", "auto")


def _run(benchmark, step, backend: str, name: str, mode: str) -> None:
    context = partial(vitkern.backend, backend)
    run_benchmark(benchmark, step, f"{name} {mode}", context, model=name, mode=mode, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODELS)
def test_inference(benchmark, name, backend):
    model = create_model(name, num_classes=NUM_CLASSES).to(DEVICE).eval()
    _run(benchmark, inference_step(model), backend, name, "inference")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODELS)
def test_training_step(benchmark, name, backend):
    model = create_model(name, num_classes=NUM_CLASSES).to(DEVICE).train()
    _run(benchmark, training_step(model), backend, name, "training step")
