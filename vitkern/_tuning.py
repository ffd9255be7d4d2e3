"""Measured choices for the CPU path, in the manner of ``torch.backends.cudnn.benchmark``.

The CPU path (``auto`` on CPU tensors) can run an op in several equivalent ways: F.conv2d on NCHW or on
channels_last, attention through matmul-softmax or SDPA. Which is fastest depends on the shape, the thread count and
the machine, so the first call with a new problem signature times each candidate and the fastest is kept for the
rest of the process. A candidate replaces the default only when it takes at most ``MIN_ADVANTAGE`` of the default's
time, so noise cannot talk the path out of the default.

Measuring is bounded so that a first call never costs much more than a later one: the measurement of a signature
starts no new call once it has spent ``MEASURE_BUDGET_S`` (so a default slower than that is never compared at all),
and a choice needs one complete round of every candidate, else the default stays.

The default is used without timing when:

* the problem is too small for the choice to matter (the caller decides, see ``worth_tuning``);
* the dtype is float16 or bfloat16, whose CPU kernels are slow in every layout: measuring the alternatives costs
  more than any choice between them can save;
* ``torch.use_deterministic_algorithms(True)`` is in force, so that results never depend on a timing;
* ``torch.compile`` is tracing;
* ``VITKERN_CPU_TUNING=0`` is set.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Hashable

import torch

ENV_VAR = "VITKERN_CPU_TUNING"
# An alternative must take at most this fraction of the default's time to replace it.
MIN_ADVANTAGE = 0.9
# Timed rounds per candidate, after one warm-up call each; rounds alternate between candidates.
ROUNDS = 3
# Problems with fewer multiply-adds than this keep the default: the measurement, and the few microseconds each
# later call spends looking its choice up, would cost more than a better choice saves. Forward-only calls are
# cheap enough that the lookup shows below MIN_TUNED_FORWARD_MACS; with a backward pass it pays from MIN_TUNED_MACS
# (ConvNeXt-T's last stage at batch 1, 1.8M multiply-adds, ran forward+backward in 2.2 ms on NCHW against 17.6 ms
# on channels_last input on 2 cores).
MIN_TUNED_MACS = 1 << 18
MIN_TUNED_FORWARD_MACS = 1 << 24
# The measurement of one signature starts no new call after this many seconds.
MEASURE_BUDGET_S = 0.25
# Dtypes that keep the default without measuring.
UNTUNED_DTYPES = (torch.float16, torch.bfloat16)

_choices: dict[Hashable, str] = {}


def enabled() -> bool:
    return (
        not torch.are_deterministic_algorithms_enabled()
        and not torch.compiler.is_compiling()
        and os.environ.get(ENV_VAR, "1") != "0"
    )


def worth_tuning(macs: int, backward: bool = True, dtype: torch.dtype = torch.float32) -> bool:
    """Whether a problem of ``macs`` multiply-adds (per forward pass) in ``dtype`` gets a measured choice, else the
    caller's default; ``backward`` says whether the call also runs a backward pass."""
    return (
        dtype not in UNTUNED_DTYPES and macs >= (MIN_TUNED_MACS if backward else MIN_TUNED_FORWARD_MACS) and enabled()
    )


def choose(key: Hashable, make_candidates: Callable[[], dict[str, Callable[[], object]]], default: str) -> str:
    """The name of the fastest candidate for ``key``, timed on the first call and remembered after that.

    ``make_candidates()`` (called only on that first call) maps names to zero-argument callables that each run the
    whole computation once; ``default`` names one of them. Candidates run without autograd.
    """
    choice = _choices.get(key)
    if choice is None:
        choice = _measure(make_candidates(), default)
        _choices[key] = choice
    return choice


def _measure(candidates: dict[str, Callable[[], object]], default: str) -> str:
    ordered = {default: candidates[default], **candidates}  # the default first: if it alone spends the budget, stop
    with torch.no_grad():
        best = best_times(ordered, ROUNDS, budget=MEASURE_BUDGET_S)
    if any(t == float("inf") for t in best.values()):
        return default
    fastest = min(best, key=best.__getitem__)
    return fastest if best[fastest] <= MIN_ADVANTAGE * best[default] else default


def best_times(
    candidates: dict[str, Callable[[], object]], rounds: int, budget: float | None = None
) -> dict[str, float]:
    """Each candidate's fastest of ``rounds`` calls in seconds, after one warm-up call each; the candidates take
    turns, so a machine whose speed drifts slows them alike.

    With a ``budget`` (seconds), no call starts once that much time has passed since the first, and only complete
    rounds count: a candidate that did not finish one complete round comes back as ``inf``.
    """
    start = time.perf_counter()

    def spent() -> bool:
        return budget is not None and time.perf_counter() - start >= budget

    best = dict.fromkeys(candidates, float("inf"))
    for run in candidates.values():
        if spent():
            return best
        run()
    for _ in range(rounds):
        if spent():
            break
        times = {}
        for name, run in candidates.items():
            if spent():
                return best
            begin = time.perf_counter()
            run()
            times[name] = time.perf_counter() - begin
        for name, t in times.items():
            best[name] = min(best[name], t)
    return best


def choices() -> dict[Hashable, str]:
    """A copy of the choices made so far in this process, by problem signature."""
    return dict(_choices)


def clear() -> None:
    """Forget every choice, so the next call of each signature measures again."""
    _choices.clear()
