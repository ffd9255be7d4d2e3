"""vitkern.tools.bench_report on a pytest-benchmark JSON that the test produces itself (a tiny benchmark file run
in a subprocess), checked against the JSON's own medians."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vitkern.tools import bench_report

REPO = Path(__file__).resolve().parents[1]

BENCH_FILE = textwrap.dedent(
    """
    import time
    import pytest

    COSTS = {"torch_conv2d": 2e-3, "auto": 1e-3}

    @pytest.mark.parametrize("impl", list(COSTS))
    @pytest.mark.parametrize("shape", ["small", "large"])
    def test_case(benchmark, shape, impl):
        benchmark.group = f"{shape}-fwd"
        cost = COSTS[impl] * (2 if shape == "large" else 1)
        benchmark.pedantic(time.sleep, args=(cost,), rounds=3, iterations=1)
        benchmark.extra_info.update(device="cpu", allocated_bytes=3 * 2**20 if impl == "auto" else 2**20)

    def test_lonely(benchmark):
        benchmark.group = "no-baseline"
        benchmark.pedantic(time.sleep, args=(1e-4,), rounds=2, iterations=1)
    """
)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """The tiny benchmark file run as ``pytest benchmarks`` runs, with benchmarks/conftest.py's progress lines."""
    tmp = tmp_path_factory.mktemp("bench")
    (tmp / "bench_tiny.py").write_text(BENCH_FILE)
    (tmp / "conftest.py").write_text((REPO / "benchmarks" / "conftest.py").read_text())
    out = tmp / "results.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp),
            str(tmp / "bench_tiny.py"),
            f"--benchmark-json={out}",
        ],
        cwd=tmp,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out, run.stdout


@pytest.fixture(scope="module")
def results(bench_run):
    return bench_run[0]


def test_long_runs_print_progress(bench_run):
    lines = [line for line in bench_run[1].splitlines() if line.startswith("[")]
    assert [line.split("]")[0] + "]" for line in lines] == [f"[{i}/5]" for i in range(1, 6)], bench_run[1]
    assert all(" elapsed, about " in line and line.endswith(" left") for line in lines), lines
    assert "bench_tiny.py::test_case[small-torch_conv2d]" in lines[0], lines[0]


def _rows(markdown: str) -> dict[tuple[str, str], list[str]]:
    rows = {}
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 5 and cells[0] not in ("case", "---"):
            rows[cells[0], cells[1]] = cells[2:]
    return rows


def test_table_gives_each_median_against_the_groups_baseline(results, capsys):
    assert bench_report.main([str(results)]) == 0
    printed = capsys.readouterr().out
    table = results.with_suffix(".md").read_text()
    assert table in printed
    rows = _rows(table)
    data = json.loads(results.read_text())
    medians = {
        (b["group"], b["params"].get("impl") if b["params"] else b["name"]): b["stats"]["median"]
        for b in data["benchmarks"]
    }
    assert set(rows) == set(medians)
    for group in ("small-fwd", "large-fwd"):
        assert rows[group, "torch_conv2d"][1] == "baseline"
        expected = medians[group, "torch_conv2d"] / medians[group, "auto"]
        assert rows[group, "auto"][1] == f"{expected:.2f}x"
        assert rows[group, "auto"][2] == "3.0 MiB" and rows[group, "torch_conv2d"][2] == "1.0 MiB"
        assert float(rows[group, "auto"][0].split()[0]) == pytest.approx(medians[group, "auto"] * 1e3, abs=0.01)
    assert rows["no-baseline", "test_lonely"][1] == "no baseline"


def test_chart_or_how_to_get_it(results, tmp_path, capsys):
    png = tmp_path / "chart.png"
    assert bench_report.main([str(results), "--png", str(png), "--markdown", str(tmp_path / "t.md")]) == 0
    out = capsys.readouterr().out
    if importlib.util.find_spec("matplotlib") is None:
        assert "pip install matplotlib" in out and not png.exists()
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_matplotlib_is_said(results, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as when it is not installed
    png = tmp_path / "none.png"
    assert bench_report.main([str(results), "--png", str(png), "--markdown", str(tmp_path / "t.md")]) == 0
    assert bench_report.MATPLOTLIB_MISSING in capsys.readouterr().out
    assert not png.exists()


def test_a_missing_file_names_the_argument(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_report.main([str(tmp_path / "nope.json")])
    assert "json: expected a pytest-benchmark JSON file" in capsys.readouterr().err
