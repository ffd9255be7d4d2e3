"""Benchmark-run progress: one line per finished benchmark with the time so far and an estimate of the time left.

A full ``pytest benchmarks`` run takes many minutes and pytest-benchmark prints its table only at the end; this line
(``[12/140] benchmarks/test_x.py::test_y[case] 3.1 s · 1m40s elapsed, about 10m left``) tells how far it is. The
estimate is the mean time per finished test times the tests left. ``-p no:vitkern_progress`` turns it off.
"""

from __future__ import annotations

import time

import pytest


def _minutes(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class BenchmarkProgress:
    """Counts the collected tests, and after each one's call phase writes its line to the terminal."""

    def __init__(self, terminal) -> None:
        self.terminal = terminal
        self.total = 0
        self.done = 0
        self.start = time.monotonic()

    def pytest_collection_finish(self, session) -> None:
        self.total = len(session.items)
        self.start = time.monotonic()

    def pytest_runtest_logreport(self, report) -> None:
        if report.when != "call" and not (report.when == "setup" and report.outcome != "passed"):
            return
        self.done += 1
        elapsed = time.monotonic() - self.start
        left = elapsed / self.done * (self.total - self.done)
        outcome = "" if report.outcome == "passed" else f" {report.outcome.upper()}"
        writer = self.terminal._tw  # the progress dots of -q leave the line open
        if writer.width_of_current_line:
            writer.line()
        self.terminal.write_line(
            f"[{self.done}/{self.total}] {report.nodeid} {report.duration:.1f} s{outcome} · "
            f"{_minutes(elapsed)} elapsed, about {_minutes(left)} left"
        )


@pytest.hookimpl(trylast=True)
def pytest_configure(config) -> None:
    terminal = config.pluginmanager.get_plugin("terminalreporter")
    if terminal is not None and not config.pluginmanager.has_plugin("vitkern_progress"):
        config.pluginmanager.register(BenchmarkProgress(terminal), "vitkern_progress")
