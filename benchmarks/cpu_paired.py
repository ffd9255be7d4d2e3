"""The CPU path against its baselines, timed in alternation: ``python benchmarks/cpu_paired.py [--rounds N]``.

pytest-benchmark times one implementation after another, so on a shared machine whose speed drifts between tests two
runs of the same computation can differ by tens of percent. This script runs every implementation of a case once per
round, in turn, and keeps each one's fastest round, so drift hits all of them alike. Cases and inputs are those of
``test_depthwise_conv.py`` and ``test_attention.py`` (CPU shapes); the 4096-token attention case is left out (seconds
per call). The model cases are ``test_models.py``'s models at its CPU batch: inference of the same model on
``eager`` and on ``auto``. Prints one line per case: the baselines' and the CPU path's best times and the ratio to
the best baseline (below 1: the CPU path is faster).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from vitkern import _tuning

sys.path.insert(0, str(Path(__file__).resolve().parent))

import test_attention as attention_bench  # noqa: E402
import test_depthwise_conv as conv_bench  # noqa: E402
import test_models as models_bench  # noqa: E402
from _common import BATCH, IMG, NUM_CLASSES  # noqa: E402

import vitkern  # noqa: E402
from vitkern.models import create_model  # noqa: E402


def report(case: str, best: dict[str, float], mine: str) -> None:
    baselines = {name: t for name, t in best.items() if name != mine}
    times = "  ".join(f"{name} {t * 1e6:9.0f} us" for name, t in best.items())
    print(f"{case:48s} {times}  ratio {best[mine] / min(baselines.values()):.2f}", flush=True)


def depthwise_cases(rounds: int) -> None:
    for shape in conv_bench.SHAPES:
        slow = shape.kernel > 15
        for layout in conv_bench.LAYOUTS:
            for backward in (False, True):
                tensors = conv_bench.make_inputs(shape, conv_bench.LAYOUTS[layout], torch.float32, backward)
                runs = {impl: conv_bench.make_runner(impl, tensors, backward) for impl in ("torch_conv2d", "auto")}
                best = _tuning.best_times(runs, max(3, rounds // 4) if slow else rounds)
                report(f"{shape.name} {layout} {'fwd_bwd' if backward else 'fwd'}", best, "auto")


def attention_cases(rounds: int) -> None:
    for case in attention_bench.CASES:
        if case.keys >= attention_bench.LONG_TOKENS:
            continue
        inputs = attention_bench.make_inputs(case)
        grad_out = torch.randn(case.batch, case.heads, case.queries, case.value_dim)
        for backward in (False, True):
            runs = {
                impl: attention_bench.make_runner(attention_bench.attention_fn(case, impl), inputs, grad_out, backward)
                for impl in ("reference", "sdpa", "vitkern")
            }
            report(f"{case.name} {'fwd_bwd' if backward else 'fwd'}", _tuning.best_times(runs, rounds), "vitkern")


def model_cases(rounds: int, names: list[str]) -> None:
    """Inference of each model on ``eager`` and on ``auto``, the same weights and input, rounds alternating."""
    for name in names:
        model = create_model(name, num_classes=NUM_CLASSES).eval()
        x = torch.randn(BATCH, 3, IMG, IMG)

        def run(backend: str, model=model, x=x):
            @torch.no_grad()
            def step() -> None:
                with vitkern.backend(backend):
                    model(x)

            return step

        runs = {backend: run(backend) for backend in models_bench.BACKENDS}
        report(f"{name} inference batch {BATCH}", _tuning.best_times(runs, max(3, rounds // 4)), "auto")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--only", choices=["depthwise", "attention", "models"])
    parser.add_argument("--model", action="append", help=f"a model for the model cases (default {models_bench.MODELS})")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.rounds} alternating rounds")
    if args.only in (None, "depthwise"):
        depthwise_cases(args.rounds)
    if args.only in (None, "attention"):
        attention_cases(args.rounds)
    if args.only in (None, "models"):
        model_cases(args.rounds, args.model or list(models_bench.MODELS))


if __name__ == "__main__":
    main()
