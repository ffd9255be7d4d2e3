"""A readable report of a pytest-benchmark run: ``python -m vitkern.tools.bench_report results.json``.

``pytest benchmarks --benchmark-json=results.json`` times every implementation of every case; this groups the
timings by case (the benchmark's ``group``: a shape and mode), puts each implementation's median beside the baseline
a user would otherwise run (``F.conv2d`` for the depthwise convolution, SDPA with a materialised bias for attention,
the plain-PyTorch ``eager`` models), and writes:

* a markdown table (``--markdown``, default ``results.md`` beside the JSON), also printed: per case, each
  implementation's median, its speed relative to the baseline (above 1: faster) and memory where the benchmark
  recorded it;
* a PNG chart of the relative speeds (``--png``, default ``results.png``) when matplotlib is installed (an optional
  dependency: ``pip install matplotlib``); without it the report says so and writes the table alone.

The implementation of a benchmark is its ``impl`` or ``backend`` parameter.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Implementations a user runs without vitkern, most preferred first: the first one present in a group is its
# baseline.
BASELINES = ("torch_conv2d", "sdpa", "eager", "reference")
IMPL_PARAMS = ("impl", "backend")
MEMORY_KEYS = ("peak_bytes", "allocated_bytes")
MATPLOTLIB_MISSING = "matplotlib is not installed, so no chart was drawn: pip install matplotlib"


@dataclass
class Entry:
    group: str
    impl: str
    median_s: float
    memory_bytes: int | None
    speedup: float | None = None  # baseline median / this median


def implementation(bench: dict) -> str:
    params = bench.get("params") or {}
    for key in IMPL_PARAMS:
        if key in params:
            return str(params[key])
    return bench["name"]


def load(path: Path) -> tuple[dict, dict[str, list[Entry]]]:
    """The run's metadata and its entries by group, each group with its speedups against its baseline."""
    data = json.loads(path.read_text())
    groups: dict[str, list[Entry]] = {}
    for bench in data.get("benchmarks", []):
        extra = bench.get("extra_info") or {}
        memory = next((extra[key] for key in MEMORY_KEYS if key in extra), None)
        entry = Entry(bench.get("group") or bench["name"], implementation(bench), bench["stats"]["median"], memory)
        groups.setdefault(entry.group, []).append(entry)
    for entries in groups.values():
        base = baseline(entries)
        for entry in entries:
            entry.speedup = None if base is None else base.median_s / entry.median_s
    return data, groups


def baseline(entries: Sequence[Entry]) -> Entry | None:
    by_impl = {entry.impl: entry for entry in entries}
    return next((by_impl[name] for name in BASELINES if name in by_impl), None)


def _time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def _bytes(count: int | None) -> str:
    return "" if count is None else f"{count / 2**20:.1f} MiB"


def machine_line(data: dict) -> str:
    """Date, machine and library versions of the run, from pytest-benchmark's metadata."""
    info = data.get("machine_info") or {}
    cpu = (info.get("cpu") or {}).get("brand_raw") or info.get("processor") or "unknown CPU"
    benches = data.get("benchmarks") or [{}]
    device = (benches[0].get("extra_info") or {}).get("device", "")
    parts = [
        str(data.get("datetime", "")).split(".")[0],
        f"{info.get('node', '')}".strip(),
        cpu,
        f"{(info.get('cpu') or {}).get('count', '?')} cores",
        f"device {device}" if device else "",
    ]
    return ", ".join(part for part in parts if part)


def markdown(data: dict, groups: dict[str, list[Entry]]) -> str:
    lines = [
        f"Run: {machine_line(data)}",
        "",
        "| case | implementation | median | vs baseline | memory |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for group, entries in groups.items():
        base = baseline(entries)
        for entry in entries:
            if entry.speedup is None:
                relative = "no baseline"
            elif entry is base:
                relative = "baseline"
            else:
                relative = f"{entry.speedup:.2f}x"
            lines.append(
                f"| {group} | {entry.impl} | {_time(entry.median_s)} | {relative} | {_bytes(entry.memory_bytes)} |"
            )
    return "\n".join(lines) + "\n"


def chart(groups: dict[str, list[Entry]], path: Path, title: str) -> bool:
    """A horizontal bar chart of every non-baseline implementation's speed relative to its baseline; False when
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    bars = [
        (f"{group}  [{entry.impl}]", entry.speedup)
        for group, entries in groups.items()
        for entry in entries
        if entry.speedup is not None and entry is not baseline(entries)
    ]
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(bars) + 1.2))
    labels, speedups = zip(*bars) if bars else ((), ())
    ax.barh(range(len(bars)), speedups, color=["tab:green" if s >= 1 else "tab:red" for s in speedups])
    ax.set_yticks(range(len(bars)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speed relative to the baseline (median; above 1: faster)")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitkern.tools.bench_report", description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="a pytest-benchmark --benchmark-json file")
    parser.add_argument("--markdown", type=Path, help="the table's path (default: the JSON's, with .md)")
    parser.add_argument("--png", type=Path, help="the chart's path (default: the JSON's, with .png)")
    args = parser.parse_args(argv)
    if not args.json.is_file():
        parser.error(f"json: expected a pytest-benchmark JSON file, got {str(args.json)!r} (no such file)")
    data, groups = load(args.json)
    if not groups:
        parser.error(f"json: expected benchmarks in {str(args.json)!r}, found none")
    table = markdown(data, groups)
    markdown_path = args.markdown or args.json.with_suffix(".md")
    markdown_path.write_text(table)
    print(table)
    png_path = args.png or args.json.with_suffix(".png")
    if chart(groups, png_path, machine_line(data)):
        print(f"table: {markdown_path}; chart: {png_path}")
    else:
        print(f"table: {markdown_path}; {MATPLOTLIB_MISSING}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
