"""vitkern._tuning: the measured choice between equivalent CPU implementations, on a fake clock."""

from __future__ import annotations

import pytest
import torch

from vitkern import _tuning


class FakeClock:
    """time.perf_counter stand-in: each candidate advances it by its own fixed cost."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def candidate(self, cost: float, calls: list[str], name: str):
        def run() -> None:
            calls.append(name)
            self.now += cost

        return run


@pytest.fixture
def clock(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(_tuning.time, "perf_counter", clock)
    monkeypatch.setattr(_tuning, "_choices", {})
    return clock


def _candidates(clock, costs, calls):
    return lambda: {name: clock.candidate(cost, calls, name) for name, cost in costs.items()}


def test_the_faster_candidate_wins_and_is_remembered(clock):
    calls = []
    make = _candidates(clock, {"default": 0.01, "other": 0.005}, calls)
    assert _tuning.choose("key", make, "default") == "other"
    assert calls.count("default") == calls.count("other") == 1 + _tuning.ROUNDS  # one warm-up, then the rounds
    calls.clear()
    assert _tuning.choose("key", make, "default") == "other"
    assert calls == [], "a remembered choice was measured again"
    assert _tuning.choices() == {"key": "other"}


def test_the_default_stays_unless_clearly_beaten(clock):
    calls = []
    close = {"default": 0.01, "other": 0.0095}  # faster, but by less than MIN_ADVANTAGE asks
    assert _tuning.choose("close", _candidates(clock, close, calls), "default") == "default"
    slower = {"default": 0.01, "other": 0.02}
    assert _tuning.choose("slower", _candidates(clock, slower, calls), "default") == "default"


def test_each_key_is_measured_on_its_own(clock):
    calls = []
    assert _tuning.choose("a", _candidates(clock, {"x": 0.01, "y": 0.001}, calls), "x") == "y"
    assert _tuning.choose("b", _candidates(clock, {"x": 0.001, "y": 0.01}, calls), "y") == "x"
    _tuning.clear()
    assert _tuning.choices() == {}


def test_a_default_slower_than_the_budget_is_never_compared(clock):
    calls = []
    slow = {"default": 2 * _tuning.MEASURE_BUDGET_S, "other": 0.001}
    assert _tuning.choose("slow", _candidates(clock, slow, calls), "default") == "default"
    assert calls == ["default"], "the alternatives ran although the default alone spent the budget"


def test_the_default_is_measured_first_whatever_the_order(clock):
    calls = []
    assert _tuning.choose("order", _candidates(clock, {"other": 0.001, "default": 0.01}, calls), "default") == "other"
    assert calls[0] == "default"


@pytest.mark.parametrize("cost", [0.001, 0.02, 0.06, 0.1, 0.2, 1.0])
def test_the_measurement_stops_at_its_budget(clock, cost):
    """The first call costs the measurement: at most the budget plus the one call that was running when it ran
    out, whatever each call costs."""
    calls = []
    costs = {"default": cost, "a": 1.5 * cost, "b": 0.8 * cost}
    _tuning.choose(("budget", cost), _candidates(clock, costs, calls), "default")
    assert clock.now <= _tuning.MEASURE_BUDGET_S + max(costs.values())
    assert len(calls) <= len(costs) * (1 + _tuning.ROUNDS)


def test_only_complete_rounds_count(clock):
    """A budget that ends inside the first round keeps the default, although the warm-ups looked faster."""
    calls = []
    cost = _tuning.MEASURE_BUDGET_S / 3  # the three warm-ups and the first round's default spend the budget
    costs = {"default": cost, "a": cost * 0.5, "b": cost * 0.5}
    assert _tuning.choose("partial", _candidates(clock, costs, calls), "default") == "default"
    assert calls.count("a") == 1


def test_candidates_run_without_autograd(clock):
    x = torch.ones(3, requires_grad=True)
    seen = []
    _tuning.choose("grad", lambda: {"a": lambda: seen.append((x * 2).requires_grad)}, "a")
    assert seen and not any(seen)


def test_no_tuning_for_small_problems_deterministic_mode_or_when_switched_off(monkeypatch):
    big = _tuning.MIN_TUNED_MACS
    assert _tuning.worth_tuning(big)
    assert not _tuning.worth_tuning(big - 1)
    assert _tuning.worth_tuning(_tuning.MIN_TUNED_FORWARD_MACS, backward=False)
    assert not _tuning.worth_tuning(_tuning.MIN_TUNED_FORWARD_MACS - 1, backward=False)
    for dtype in (torch.float16, torch.bfloat16):
        assert not _tuning.worth_tuning(big, dtype=dtype), f"{dtype} was tuned on CPU"
    assert _tuning.worth_tuning(big, dtype=torch.float32)
    monkeypatch.setenv(_tuning.ENV_VAR, "0")
    assert not _tuning.worth_tuning(big)
    monkeypatch.delenv(_tuning.ENV_VAR)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not _tuning.worth_tuning(big)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert _tuning.worth_tuning(big)
