"""The GPU check, ``bash benchmarks/gpu_check.sh``: its CPU dry run end to end, and the perf-model matching.

The dry run runs every stage but the build and the sanitizer on CPU tensors at tiny shapes. Its figures are checked
against hand counts of the bytes and FLOPs of two tiny cases, and every vitkern forward it timed against the
reference (the check column), so a driver that times the wrong thing or skips silently fails here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402

FP32_BYTES = 4


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script must set it itself
    env["PYTHON"] = sys.executable
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    return proc, out


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["timings"]


def test_dry_run_passes_and_writes_its_results(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "verdict: passed" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["verdict"] == "passed"
    assert results["environment"]["run"].startswith("dry run")
    assert [t["set"] for t in results["tests"]] == ["fast"] and results["tests"][0]["status"] == "passed"
    assert results["sanitizer"][0]["status"] == "passed" and results["sanitizer"][0]["cases"] > 0
    # the table is printed last, as written to results.md
    table = gpu_check.results_table(results["timings"])
    assert table in (out / "results.md").read_text()
    assert proc.stdout.rstrip().endswith(table.splitlines()[-1] + "\nverdict: passed")
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert (out / "results.png").exists() == has_matplotlib
    if not has_matplotlib:
        assert "results.png not written: matplotlib is not installed" in proc.stdout


def test_dry_run_covers_every_shape_mode_and_implementation(dry_run):
    _, out = dry_run
    seen = {(r["shape"], r["mode"], r["impl"], r["layout"]) for r in _rows(out)}
    for shape in gpu_check.CONV_SHAPES:
        for mode in gpu_check.MODES:
            for layout in gpu_check.LAYOUTS:
                for impl in ("vitkern triton", "vitkern cuda", "F.conv2d"):
                    assert (shape, mode, impl, layout) in seen
    for shape in gpu_check.ATTENTION_SHAPES:
        for mode in gpu_check.MODES:
            for impl in ("vitkern triton", "vitkern cuda", "SDPA + bias", "FlexAttention"):
                assert (shape, mode, impl, "-") in seen


def test_dry_run_rows_are_timed_checked_or_say_why_not(dry_run):
    _, out = dry_run
    for r in _rows(out):
        if r["impl"] == "FlexAttention":
            assert r["median_us"] is None and r["note"].startswith("skipped: FlexAttention runs on CUDA only")
        elif r["impl"] == "vitkern cuda" and "attention" in r["op"]:
            # no CUDA C++ attention kernel yet: the row says so instead of a time
            assert r["median_us"] is not None or "has no CUDA C++" in r["note"], r
        else:
            assert r["median_us"] is not None and r["median_us"] > 0, r
            assert r["runs"] == gpu_check.DRY_RUN_RUNS
        if r["impl"].startswith("vitkern") and r["mode"] == "fwd" and r["median_us"] is not None:
            assert r["check"] == "ok", r


def _row(out: Path, shape: str, mode: str, impl: str, layout: str) -> dict:
    (row,) = [r for r in _rows(out) if (r["shape"], r["mode"], r["impl"], r["layout"]) == (shape, mode, impl, layout)]
    return row


def test_dry_run_figures_match_hand_counts(dry_run):
    _, out = dry_run
    tiny = gpu_check.TINY_CONV
    # ConvMixer block forward, 9x9: x read, residual read, y written; 2 FLOPs per tap and output
    elements = tiny["batch"] * tiny["cpu_channels"] * tiny["size"] ** 2
    row = _row(out, "convmixer_1536_20", "fwd", "F.conv2d", "nchw")
    seconds = row["median_us"] * 1e-6
    assert row["GBps"] * 1e9 * seconds == pytest.approx(3 * elements * FP32_BYTES, rel=1e-9)
    assert row["TFLOPps"] * 1e12 * seconds == pytest.approx(2 * elements * 81, rel=1e-9)
    # CoAtNet stage 3 forward: q, k, v read and out written; two matmuls over head dims 32 + 32
    att = gpu_check.TINY_ATTENTION
    tokens = att["side"] ** 2
    row = _row(out, "coatnet0_s3", "fwd", "SDPA + bias", "-")
    seconds = row["median_us"] * 1e-6
    assert row["GBps"] * 1e9 * seconds == pytest.approx(
        att["batch"] * att["heads"] * tokens * 32 * 4 * FP32_BYTES, rel=1e-9
    )
    assert row["TFLOPps"] * 1e12 * seconds == pytest.approx(2 * att["batch"] * att["heads"] * tokens**2 * 64, rel=1e-9)
    ceilings = json.loads((out / "results.json").read_text())["ceilings"]
    assert row["of_copy"] == pytest.approx(row["GBps"] / ceilings["copy_GBps"])


def test_perf_model_rows_are_summed_per_implementation():
    def row(impl, mode, layout="nchw", shape="convnext_t_stage2"):
        return {"shape": shape, "impl": impl, "mode": mode, "layout": layout, "dtype": "bfloat16", "estimate_us": None}

    rows = [
        row("vitkern cuda", "fwd"),
        row("vitkern cuda", "fwd+bwd"),
        row("vitkern triton", "fwd", "channels_last"),
        row("cuDNN F.conv2d", "fwd"),
        row("vitkern triton", "fwd", "-", "swin_t_windows"),
    ]
    estimates = [
        {
            "shape": "convnext_t_stage2",
            "kernel": "dwconv_fwd",
            "backend": "cuda",
            "dtype": "bf16",
            "layout": "nchw",
            "estimate_us": 10.0,
        },
        {
            "shape": "convnext_t_stage2",
            "kernel": "dwconv_dx",
            "backend": "cuda",
            "dtype": "bf16",
            "layout": "nchw",
            "estimate_us": 20.0,
        },
        {
            "shape": "convnext_t_stage2",
            "kernel": "dwconv_dweight",
            "backend": "cuda",
            "dtype": "bf16",
            "layout": "nchw",
            "estimate_us": 30.0,
        },
        {
            "shape": "convnext_t_stage2",
            "kernel": "dwconv_fwd",
            "backend": "cuda",
            "dtype": "fp16",
            "layout": "nchw",
            "estimate_us": 99.0,
        },
        {
            "shape": "convnext_t_stage2",
            "kernel": "dwconv_fwd",
            "backend": "triton",
            "dtype": "bfloat16",
            "layout": "channels_last",
            "estimate_us": 7.0,
        },
        {
            "shape": "swin_t_windows",
            "kernel": "attention_fwd",
            "backend": "triton",
            "dtype": "bf16",
            "layout": "-",
            "estimate_us": 5.0,
        },
    ]
    assert gpu_check.match_estimates(rows, estimates) == 4
    assert [r["estimate_us"] for r in rows] == [10.0, 60.0, 7.0, None, 5.0]
