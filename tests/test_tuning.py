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
    make = _candidates(clock, {"default": 1.0, "other": 0.5}, calls)
    assert _tuning.choose("key", make, "default") == "other"
    assert calls.count("default") == calls.count("other") == 1 + _tuning.ROUNDS  # one warm-up, then the rounds
    calls.clear()
    assert _tuning.choose("key", make, "default") == "other"
    assert calls == [], "a remembered choice was measured again"
    assert _tuning.choices() == {"key": "other"}


def test_the_default_stays_unless_clearly_beaten(clock):
    calls = []
    close = {"default": 1.0, "other": 0.95}  # faster, but by less than MIN_ADVANTAGE asks
    assert _tuning.choose("close", _candidates(clock, close, calls), "default") == "default"
    slower = {"default": 1.0, "other": 2.0}
    assert _tuning.choose("slower", _candidates(clock, slower, calls), "default") == "default"


def test_each_key_is_measured_on_its_own(clock):
    calls = []
    assert _tuning.choose("a", _candidates(clock, {"x": 1.0, "y": 0.1}, calls), "x") == "y"
    assert _tuning.choose("b", _candidates(clock, {"x": 0.1, "y": 1.0}, calls), "y") == "x"
    _tuning.clear()
    assert _tuning.choices() == {}


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
