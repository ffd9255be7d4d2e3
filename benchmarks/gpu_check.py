"""Stages 2-6 of the GPU check (``bash benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]``, which builds first).

2. ceilings: a large device-to-device copy (GB/s, bytes read plus bytes written) and a large bf16 matmul
   (TFLOP/s), each the median of timed runs;
3. tests: ``pytest -m "not slow"``, then ``pytest -m slow`` with the time left, each under a time cap;
4. sanitizer: ``compute-sanitizer --tool memcheck`` and ``--tool racecheck`` over ``benchmarks/gpu_sanitize.py``
   (every CUDA C++ kernel at small shapes), where compute-sanitizer is on the PATH;
5. timings: every op at the headline shapes, forward and forward+backward, per implementation: the vitkern
   backends (triton, cuda) in both memory formats against cuDNN ``F.conv2d`` (NCHW and channels_last) for the
   depthwise convolution, against SDPA with the bias materialised and FlexAttention for attention. Each vitkern
   forward is first checked against the eager reference. Times are CUDA-event pairs around single calls after
   warm-up, the median of many; the calls rotate over copies of their inputs that together exceed twice the L2
   cache, so L2 never serves an input from the previous call. Where ``vitkern.tools.perf_model`` exists, its
   estimate (``python -m vitkern.tools.perf_model --json``, run in the background from stage 2) stands beside the
   measured time;
6. results: ``results.md`` (one table), ``results.json`` and, with matplotlib, ``results.png`` in OUT_DIR; the table
   is printed last.

Each stage caps its own time (:data:`STAGE_CAPS`, shrunk when less is left before the 9-minute deadline counted
from the start of stage 1) and says what it skipped. ``--dry-run`` runs the same stages on CPU tensors at tiny
shapes, without sanitizer (its driver runs plainly, on the emulation build) and with the fast tests of one file.
Exit status 1 when a test, the sanitizer or an output check failed, else 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import vitkern
from vitkern.testing import assert_close

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))

import test_attention as attention_bench  # noqa: E402
import test_depthwise_conv as conv_bench  # noqa: E402

TOTAL_SECONDS = 540  # the whole check, the build included, on an H100/H200
# The dry run's work is a fixed handful of calls at tiny shapes; its caps only stop a run that hangs, so that on a
# loaded machine it is slow rather than different.
DRY_RUN_TOTAL_SECONDS = 1800
# Seconds each stage may take at most (GPU run / dry run), and the least it is left by the stages before it.
STAGE_CAPS = {"ceilings": (20, 300), "tests": (200, 300), "sanitizer": (80, 300), "timings": (150, 900)}
STAGE_FLOORS = {"ceilings": 5, "tests": 30, "sanitizer": 20, "timings": 60, "results": 5}
SLOW_TESTS_MIN_SECONDS = 20  # the slow tests start only with this much of the tests' cap left
# Ceilings: a 1 GiB copy and an 8192^3 bf16 matmul on the GPU; 16 MiB and 256^3 fp32 on the dry run's CPU.
COPY_BYTES = (1 << 30, 1 << 24)
MATMUL_SIZE = (8192, 256)
# Timings: warm-up calls, then between MIN_RUNS and MAX_RUNS timed calls within each measurement's share of time
# (GPU run, dry run: there only enough calls to run the code).
WARMUP_CALLS = (3, 1)
MIN_RUNS = 10
DRY_RUN_RUNS = 1
MAX_RUNS = 200
MAX_INPUT_COPIES = 16
DEFAULT_L2_BYTES = 64 << 20
# The headline shapes, by their names in benchmarks/test_depthwise_conv.py and benchmarks/test_attention.py.
CONV_SHAPES = ("convmixer_1536_20", "convnext_t_stage2", "replknet_31b_stage1")
ATTENTION_SHAPES = ("coatnet0_s3", "swin_t_windows", "levit128s_s1", "levit128s_shrink1")
# The dry run's tiny versions: batch, channels and map size for convolution (kernel sizes kept), batch, heads and
# map side for attention (head dims and strides kept).
TINY_CONV = {"batch": 1, "channels": 2, "cpu_channels": 2, "size": 6}
TINY_ATTENTION = {"batch": 1, "heads": 1, "side": 5}
PERF_MODEL = "vitkern.tools.perf_model"
DRY_RUN_TESTS = "tests/test_no_atomics.py"  # the dry run's stage 3: one small test file through the same command
MODES = ("fwd", "fwd+bwd")
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


@dataclass
class Check:
    """The run's settings and clock."""

    dry_run: bool
    out: Path
    deadline: float
    device: torch.device
    dtype: torch.dtype
    log: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.log.append(line)

    def left(self) -> float:
        return self.deadline - time.time()

    def budget(self, stage: str) -> float:
        """Seconds for ``stage``: its cap, or less so that the later stages keep their floors."""
        stages = list(STAGE_FLOORS)
        later = sum(STAGE_FLOORS[s] for s in stages[stages.index(stage) + 1 :])
        cap = STAGE_CAPS[stage][1 if self.dry_run else 0]
        return max(0.0, min(cap, self.left() - later))

    def pick(self, gpu, dry):
        return dry if self.dry_run else gpu

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


# --- timing -----------------------------------------------------------------------------------------------------


def time_calls(check: Check, calls: list[Callable[[], object]], seconds: float) -> list[float]:
    """Seconds of single calls of ``calls[i % len(calls)]`` after warm-up (the last warm-up call timed to size the
    run): CUDA-event pairs on the GPU, queued back to back and read after one synchronisation; perf_counter pairs
    on the CPU. As many calls as fit in ``seconds``, within [MIN_RUNS, MAX_RUNS]."""
    warmup = check.pick(*WARMUP_CALLS)
    for i in range(warmup - 1):
        calls[i % len(calls)]()
    check.sync()
    start = time.perf_counter()
    calls[(warmup - 1) % len(calls)]()
    check.sync()
    once = max(time.perf_counter() - start, 1e-6)
    runs = check.pick(int(min(MAX_RUNS, max(MIN_RUNS, seconds / once))), DRY_RUN_RUNS)
    if check.device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
        for i, (begin, end) in enumerate(events):
            begin.record()
            calls[i % len(calls)]()
            end.record()
        torch.cuda.synchronize()
        return [begin.elapsed_time(end) * 1e-3 for begin, end in events]
    times = []
    for i in range(runs):
        start = time.perf_counter()
        calls[i % len(calls)]()
        times.append(time.perf_counter() - start)
    return times


def input_copies(check: Check, nbytes: int) -> int:
    """How many copies of a call's inputs to rotate over: together at least twice the L2 cache (one on the CPU,
    whose dry run measures nothing)."""
    if check.device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(check.device), "L2_cache_size", 0) or DEFAULT_L2_BYTES
    return max(2, min(MAX_INPUT_COPIES, math.ceil(2 * l2 / max(nbytes, 1))))


# --- stage 2: ceilings ------------------------------------------------------------------------------------------


def stage_ceilings(check: Check) -> dict[str, float]:
    check.say("== stage 2: ceilings")
    nbytes = check.pick(*COPY_BYTES)
    src = torch.empty(nbytes, dtype=torch.uint8, device=check.device)
    dst = torch.empty_like(src)
    seconds = check.budget("ceilings") / 2
    copy_s = statistics.median(time_calls(check, [lambda: dst.copy_(src)], seconds))
    n = check.pick(*MATMUL_SIZE)
    a = torch.randn(n, n, device=check.device, dtype=check.dtype)
    b = torch.randn(n, n, device=check.device, dtype=check.dtype)
    matmul_s = statistics.median(time_calls(check, [lambda: a @ b], seconds))
    ceilings = {"copy_GBps": 2 * nbytes / copy_s / 1e9, "matmul_TFLOPps": 2 * n**3 / matmul_s / 1e12}
    check.say(
        f"stage 2: copy {ceilings['copy_GBps']:.4g} GB/s ({nbytes >> 20} MiB, read + write), "
        f"{str(check.dtype).removeprefix('torch.')} matmul {ceilings['matmul_TFLOPps']:.4g} TFLOP/s ({n}^3)"
    )
    return ceilings


# --- stage 3: tests ---------------------------------------------------------------------------------------------


def _pytest_summary(output: str) -> str:
    """pytest's closing counts ("12 passed, 1 failed in 3.2s"), or the last line when there is none."""
    lines = [line.strip("= ") for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.search(r"\d+ (passed|failed|error|errors|skipped|deselected)", line):
            return line
    return lines[-1] if lines else "(no output)"


def run_capped(check: Check, command: list[str], seconds: float, log_name: str) -> tuple[int | None, str]:
    """Run ``command`` from the repository root for at most ``seconds``; its output goes to OUT_DIR/log_name.
    Returns (exit status or None when it was stopped at the cap, output)."""
    log = check.out / log_name
    with open(log, "w", encoding="utf-8") as sink:
        try:
            proc = subprocess.run(
                command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, timeout=seconds, check=False
            )
            status = proc.returncode
        except subprocess.TimeoutExpired:
            status = None
    return status, log.read_text(encoding="utf-8", errors="replace")


def stage_tests(check: Check) -> list[dict]:
    check.say("== stage 3: tests" + (" (dry run: the fast tests of " + DRY_RUN_TESTS + ")" if check.dry_run else ""))
    cap = check.budget("tests")
    end = time.time() + cap
    sets = [("fast", ["-m", "not slow"])]
    if not check.dry_run:
        sets.append(("slow", ["-m", "slow"]))
    # On the GPU this check is itself the proof that its dry run works: its test is left out there.
    targets = [DRY_RUN_TESTS] if check.dry_run else ["--ignore", "tests/test_gpu_check.py"]
    results = []
    for name, marker in sets:
        seconds = end - time.time()
        if name == "slow" and seconds < SLOW_TESTS_MIN_SECONDS:
            check.say(f"stage 3: skipped the slow tests: {seconds:.0f} s left of the stage's {cap:.0f} s cap")
            results.append({"set": name, "status": "skipped", "summary": "no time left"})
            continue
        command = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *marker, *targets]
        started = time.time()
        status, output = run_capped(check, command, seconds, f"tests_{name}.log")
        summary = _pytest_summary(output)
        verdict = _verdict(check, status, seconds, f"{name} tests", summary, cap_fails=True)
        check.say(f"stage 3: {name} tests {verdict} in {time.time() - started:.0f} s: {summary}")
        results.append({"set": name, "status": verdict, "summary": summary, "log": f"tests_{name}.log"})
    return results


# --- stage 4: compute-sanitizer ---------------------------------------------------------------------------------


def stage_sanitizer(check: Check) -> list[dict]:
    check.say("== stage 4: compute-sanitizer")
    driver = [sys.executable, str(BENCHMARKS / "gpu_sanitize.py")]
    if check.dry_run:
        status, output = run_capped(check, driver, check.budget("sanitizer"), "sanitizer_driver.log")
        ran = sum(line.startswith("ran ") for line in output.splitlines())
        verdict = "passed" if status == 0 else "failed"
        if status != 0:
            check.failures.append("sanitizer driver: " + _last_line(output))
        check.say(f"stage 4: dry run, no sanitizer: the driver alone {verdict}, {ran} cases")
        return [{"tool": "none (dry run)", "status": verdict, "cases": ran}]
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        check.say("stage 4: skipped: compute-sanitizer is not on the PATH")
        return [{"tool": "compute-sanitizer", "status": "skipped: not on the PATH"}]
    results = []
    tools = ("memcheck", "racecheck")
    for i, tool in enumerate(tools):
        seconds = check.budget("sanitizer") / (len(tools) - i)
        # Only vitkern's kernels (namespace vitkern) are instrumented: torch's own would multiply the time.
        command = [
            sanitizer,
            "--tool",
            tool,
            "--error-exitcode",
            "1",
            "--print-limit",
            "20",
            "--kernel-name",
            "kns=vitkern",
            *driver,
        ]
        started = time.time()
        status, output = run_capped(check, command, seconds, f"sanitizer_{tool}.log")
        summary = _last_line(output)
        verdict = _verdict(check, status, seconds, tool, summary, cap_fails=False)
        check.say(f"stage 4: {tool} {verdict} in {time.time() - started:.0f} s: {summary}")
        results.append({"tool": tool, "status": verdict, "summary": summary, "log": f"sanitizer_{tool}.log"})
    return results


def _verdict(check: Check, status: int | None, seconds: float, what: str, summary: str, cap_fails: bool) -> str:
    """ "passed", "failed (exit N)" (a failure of the check) or "stopped at the N s cap" (a failure if cap_fails)
    for a capped command's exit status (None: stopped at the cap)."""
    if status == 0:
        return "passed"
    if status is None:
        verdict = f"stopped at the {seconds:.0f} s cap"
        if cap_fails:
            check.failures.append(f"{what}: {verdict}")
        return verdict
    check.failures.append(f"{what}: {summary}")
    return f"failed (exit {status})"


def _last_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


# --- stage 5: timings -------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    """One (shape, mode, implementation): how to build its inputs and call it."""

    shape: str
    op: str
    mode: str
    impl: str
    layout: str
    make: Callable[[], tuple[Callable[[], object], int]]  # -> (call, input bytes), rebuilt per input copy
    traffic: tuple[float, float]  # (bytes, FLOPs) of one call
    check: Callable[[], None] | None = None  # the forward against the reference, for vitkern implementations


def _conv_shapes(check: Check) -> list:
    shapes = [conv_bench.SHAPES_BY_NAME[name] for name in CONV_SHAPES]
    return [dataclasses.replace(s, **TINY_CONV) for s in shapes] if check.dry_run else shapes


def _attention_cases(check: Check) -> list:
    by_name = {case.name: case for case in attention_bench.CASES}
    cases = [by_name[name] for name in ATTENTION_SHAPES]
    return [dataclasses.replace(c, **TINY_ATTENTION) for c in cases] if check.dry_run else cases


def _conv_inputs(check: Check, shape, layout: str, backward: bool) -> dict[str, torch.Tensor]:
    batch, channels = (shape.batch, shape.channels) if not check.dry_run else (shape.batch, shape.cpu_channels)
    k = shape.kernel
    x = torch.randn(batch, channels, shape.size, shape.size, device=check.device).to(
        dtype=check.dtype, memory_format=LAYOUTS[layout]
    )
    tensors = {
        "x": x,
        "weight": torch.randn(channels, 1, k, k, device=check.device, dtype=check.dtype) / k,
        "bias": torch.randn(channels, device=check.device, dtype=check.dtype),
    }
    if shape.convmixer_epilogue:
        tensors["scale"] = torch.randn(channels, device=check.device, dtype=check.dtype)
        tensors["shift"] = torch.randn(channels, device=check.device, dtype=check.dtype)
        tensors["residual"] = torch.randn_like(x)
    return {name: t.requires_grad_(backward) for name, t in tensors.items()}


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _step(fn: Callable[..., torch.Tensor], args: list[torch.Tensor], backward: bool, backend: str):
    """One call of ``fn(*args)`` on ``backend``; with ``backward`` also the gradients of every argument."""
    grad_out = None

    def call():
        nonlocal grad_out
        with vitkern.backend(backend), torch.set_grad_enabled(backward):
            out = fn(*args)
            if backward:
                if grad_out is None:
                    grad_out = torch.randn_like(out)
                torch.autograd.grad(out, args, grad_out)

    return call


def _check_conv(check: Check, shape, layout: str, impl_backend: str) -> Callable[[], None]:
    def run():
        tensors = _conv_inputs(check, shape, layout, backward=False)
        with torch.no_grad():
            with vitkern.backend(impl_backend):
                actual = conv_bench._vitkern_block(**tensors)
            with vitkern.backend("eager"):
                expected = conv_bench._vitkern_block(**{k: t.float() for k, t in tensors.items()})
                same = None if check.dtype == torch.float32 else conv_bench._vitkern_block(**tensors)
        assert_close(actual, expected, same)

    return run


def _check_attention(case, impl_backend: str) -> Callable[[], None]:
    def run():
        inputs = attention_bench.make_inputs(case)
        with vitkern.backend(impl_backend):
            attention_bench.check_output(case, attention_bench.attention_fn(case, "vitkern"), inputs)

    return run


def _attention_traffic(case, nbytes: int, backward: bool) -> tuple[float, float]:
    """(bytes, FLOPs) a fused attention cannot avoid: q, k, v read and out written once (with the backward: dout,
    q, k, v, out read again, dq, dk, dv written); the FLOPs of the two matmuls, times 3.5 with the backward."""
    flops = 2.0 * case.batch * case.heads * case.queries * case.keys * (case.head_dim + case.value_dim)
    qkv_out = (
        (case.queries * case.head_dim + case.keys * (case.head_dim + case.value_dim) + case.queries * case.value_dim)
        * case.batch
        * case.heads
        * nbytes
    )
    if backward:
        return 3.0 * qkv_out, flops * attention_bench.BACKWARD_FLOP_FACTOR
    return float(qkv_out), flops


def measurements(check: Check) -> list[Measurement]:
    """Every (shape, mode, implementation) of stage 5, essential ones first: FlexAttention (slow to compile) last."""
    rows, flex = [], []
    vitkern_backends = ("triton", "cuda")
    for shape, mode in ((s, m) for s in _conv_shapes(check) for m in MODES):
        backward = mode == "fwd+bwd"
        for layout in LAYOUTS:
            probe = _conv_inputs(check, shape, layout, backward=False)
            traffic = conv_bench._traffic(shape, probe, backward)
            impls = [(f"vitkern {b}", b, conv_bench._vitkern_block) for b in vitkern_backends]
            impls.append(
                ("cuDNN F.conv2d" if check.device.type == "cuda" else "F.conv2d", "auto", conv_bench._torch_block)
            )
            for impl, backend, block in impls:

                def make(shape=shape, layout=layout, backward=backward, backend=backend, block=block):
                    tensors = _conv_inputs(check, shape, layout, backward)
                    names = list(tensors)
                    fn = lambda *args: block(**dict(zip(names, args)))  # noqa: E731
                    return _step(fn, list(tensors.values()), backward, backend), _nbytes(tensors.values())

                checker = (
                    _check_conv(check, shape, layout, backend) if impl.startswith("vitkern") and not backward else None
                )
                rows.append(Measurement(shape.name, "depthwise_conv2d", mode, impl, layout, make, traffic, checker))
    for case, mode in ((c, m) for c in _attention_cases(check) for m in MODES):
        backward = mode == "fwd+bwd"
        op = "rel_pos_attention" if case.kind == "rel_pos" else "levit_attention"
        traffic = _attention_traffic(case, torch.finfo(check.dtype).bits // 8, backward)
        impls = [(f"vitkern {b}", b, "vitkern") for b in vitkern_backends] + [("SDPA + bias", "auto", "sdpa")]
        for impl, backend, kind in impls + [("FlexAttention", "auto", "flex")]:
            # one callable for every input copy: FlexAttention is compiled once per measurement
            def make(case=case, backward=backward, backend=backend, fn=attention_bench.attention_fn(case, kind)):  # noqa: B008
                inputs = attention_bench.make_inputs(case)
                return _step(fn, list(inputs), backward, backend), _nbytes(inputs)

            checker = _check_attention(case, backend) if kind == "vitkern" and not backward else None
            row = Measurement(case.name, op, mode, impl, "-", make, traffic, checker)
            (flex if kind == "flex" else rows).append(row)
    return rows + flex


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def stage_timings(check: Check, ceilings: dict[str, float]) -> list[dict]:
    check.say("== stage 5: timings")
    todo = measurements(check)
    end = time.time() + check.budget("timings")
    results = []
    for index, m in enumerate(todo):
        row = {
            "shape": m.shape,
            "op": m.op,
            "mode": m.mode,
            "impl": m.impl,
            "layout": m.layout,
            "dtype": str(check.dtype).removeprefix("torch."),
            "median_us": None,
            "runs": 0,
            "GBps": None,
            "TFLOPps": None,
            "of_copy": None,
            "of_matmul": None,
            "estimate_us": None,
            "check": "",
            "note": "",
        }
        results.append(row)
        left = end - time.time()
        if left <= 0:
            row["note"] = "skipped: the stage's time cap"
            continue
        if m.impl == "FlexAttention" and check.device.type != "cuda":
            row["note"] = "skipped: FlexAttention runs on CUDA only here (torch has no CPU backward for it)"
            continue
        try:
            if m.check is not None:
                m.check()
                row["check"] = "ok"
            first, nbytes = m.make()
            calls = [first] + [m.make()[0] for _ in range(input_copies(check, nbytes) - 1)]
            times = time_calls(check, calls, min(left, 2 * left / (len(todo) - index)))
        except AssertionError as error:
            row["check"] = "FAILED"
            row["note"] = _first_line(error)
            check.failures.append(f"{m.shape} {m.impl} {m.layout}: output check failed")
            continue
        except Exception as error:  # an implementation that cannot run this case: recorded, the others go on
            row["note"] = _first_line(error)
            if "has no CUDA C++" not in row["note"]:
                check.failures.append(f"{m.shape} {m.mode} {m.impl} {m.layout}: {row['note']}")
            continue
        finally:
            if check.device.type == "cuda":
                torch.cuda.empty_cache()
        median = statistics.median(times)
        nbytes_moved, flops = m.traffic
        row.update(
            median_us=median * 1e6, runs=len(times), GBps=nbytes_moved / median / 1e9, TFLOPps=flops / median / 1e12
        )
        row["of_copy"] = row["GBps"] / ceilings["copy_GBps"]
        row["of_matmul"] = row["TFLOPps"] / ceilings["matmul_TFLOPps"]
        check.say(f"stage 5: {m.shape} {m.mode} {m.impl} {m.layout}: {row['median_us']:.1f} us")
    skipped = sum(r["note"].startswith("skipped") for r in results)
    check.say(f"stage 5: {len(results) - skipped} of {len(results)} timed or tried, {skipped} skipped")
    return results


# --- the perf model's estimates ---------------------------------------------------------------------------------


def start_perf_model(check: Check) -> subprocess.Popen | str:
    """``python -m vitkern.tools.perf_model --json`` in the background where the module exists (not on the dry run,
    whose 2-core machines would spend minutes compiling for sm_90), else why not."""
    if importlib.util.find_spec(PERF_MODEL) is None:
        return f"no estimate column: {PERF_MODEL} does not exist here"
    if check.dry_run:
        return "no estimate column: the dry run does not run the perf model"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # it compiles for sm_90
    with open(check.out / "perf_model.log", "w", encoding="utf-8") as log:
        return subprocess.Popen(
            [sys.executable, "-m", PERF_MODEL, "--json", str(check.out / "perf_model.json")],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )


_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_NO_LAYOUT = {"-", "", "none"}


def _norm(value) -> str:
    text = str(value).lower().removeprefix("torch.")
    return _DTYPE_NAMES.get(text, text)


def match_estimates(rows: list[dict], estimates: list[dict]) -> int:
    """Set ``estimate_us`` of each vitkern row to the sum of the perf model's rows (keys ``shape``, ``kernel``,
    ``backend``, ``dtype``, ``layout``, ``estimate_us``) for the same shape, backend, dtype and layout: all its
    kernels for "fwd+bwd", the forward ones ("fwd" or "forward" in the kernel name) for "fwd". Returns how many
    rows got one."""
    matched = 0
    for row in rows:
        if not row["impl"].startswith("vitkern "):
            continue
        backend = row["impl"].split()[1]
        layouts = _NO_LAYOUT if row["layout"] == "-" else {row["layout"]}
        picked = [
            e["estimate_us"]
            for e in estimates
            if _norm(e.get("shape")) == row["shape"]
            and _norm(e.get("backend")) == backend
            and _norm(e.get("dtype")) == row["dtype"]
            and _norm(e.get("layout", "-")) in layouts
            and (row["mode"] == "fwd+bwd" or "fwd" in _norm(e.get("kernel")) or "forward" in _norm(e.get("kernel")))
        ]
        if picked:
            row["estimate_us"] = sum(picked)
            matched += 1
    return matched


def add_estimates(check: Check, perf_model: subprocess.Popen | str, rows: list[dict]) -> str:
    """Wait for the perf model (within the time left) and put its estimates beside the rows; says what happened."""
    if isinstance(perf_model, str):
        return perf_model
    try:
        perf_model.wait(timeout=max(1.0, check.left() - STAGE_FLOORS["results"]))
    except subprocess.TimeoutExpired:
        perf_model.kill()
        return "no estimates: the perf model did not finish in the time left"
    path = check.out / "perf_model.json"
    if perf_model.returncode != 0 or not path.exists():
        return f"no estimates: the perf model exited {perf_model.returncode} (perf_model.log)"
    matched = match_estimates(rows, json.loads(path.read_text(encoding="utf-8")))
    return f"perf model estimates beside {matched} rows"


# --- stage 6: results -------------------------------------------------------------------------------------------


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def results_table(rows: list[dict]) -> str:
    header = (
        "| shape | op | mode | implementation | layout | median us | GB/s | TFLOP/s | of copy | of matmul "
        "| estimate us | check | note |"
    )
    lines = [header, "| " + " | ".join(["---"] * (header.count("|") - 1)) + " |"]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['op']} | {r['mode']} | {r['impl']} | {r['layout']} | {_fmt(r['median_us'], '.1f')} "
            f"| {_fmt(r['GBps'], '.4g')} | {_fmt(r['TFLOPps'], '.3g')} | {_fmt(r['of_copy'], '.1%')} "
            f"| {_fmt(r['of_matmul'], '.2%')} | {_fmt(r['estimate_us'], '.1f')} | {r['check']} | {r['note']} |"
        )
    return "\n".join(lines)


def write_plot(rows: list[dict], path: Path) -> str:
    """results.png: median time per implementation, one panel per (shape, mode), where matplotlib is installed."""
    if importlib.util.find_spec("matplotlib") is None:
        return "results.png not written: matplotlib is not installed"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["median_us"] is not None:
            groups.setdefault((r["shape"], r["mode"]), []).append(r)
    if not groups:
        return "results.png not written: no timings"
    columns = 2
    fig_rows = math.ceil(len(groups) / columns)
    fig, axes = plt.subplots(fig_rows, columns, figsize=(14, 2.2 * fig_rows), squeeze=False)
    for ax, ((shape, mode), items) in zip(axes.flat, groups.items()):
        labels = [f"{r['impl']} {r['layout']}".replace(" -", "") for r in items]
        ax.barh(labels, [r["median_us"] for r in items])
        ax.set_title(f"{shape} {mode}", fontsize=9)
        ax.set_xlabel("median us")
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return "results.png written"


def environment(check: Check) -> dict[str, str]:
    device = torch.cuda.get_device_name(check.device) if check.device.type == "cuda" else platform.processor() or "cpu"
    triton_version = importlib.import_module("triton").__version__ if importlib.util.find_spec("triton") else "-"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "triton": triton_version,
        "python": platform.python_version(),
        "dtype": str(check.dtype).removeprefix("torch."),
        "run": "dry run (CPU, tiny shapes)" if check.dry_run else "GPU",
    }


def stage_results(check: Check, env, ceilings, tests, sanitizer, rows, estimate_note) -> None:
    table = results_table(rows)
    plot_note = write_plot(rows, check.out / "results.png")
    verdict = "FAILED: " + "; ".join(check.failures) if check.failures else "passed"
    md = [
        f"# vitkern GPU check: {env['device']}, {env['date']}",
        "",
        ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("date", "device")),
        "",
        (
            f"Ceilings: copy {ceilings['copy_GBps']:.4g} GB/s (read + write), matmul "
            f"{ceilings['matmul_TFLOPps']:.4g} TFLOP/s. Verdict: {verdict}."
        ),
        "",
        *[f"- tests ({t['set']}): {t['status']}: {t['summary']}" for t in tests],
        *[
            f"- sanitizer {s['tool']}: {s['status']}" + (f": {s['summary']}" if s.get("summary") else "")
            for s in sanitizer
        ],
        f"- {estimate_note}; {plot_note}",
        "",
        (
            "Median of single calls timed with CUDA events (perf_counter on the CPU) after warm-up, inputs rotated "
            "past the L2 cache on the GPU. GB/s and TFLOP/s count the bytes and FLOPs a fused implementation cannot "
            "avoid; 'of copy' and 'of matmul' divide "
            "them by the ceilings above."
        ),
        "",
        table,
        "",
    ]
    (check.out / "results.md").write_text("\n".join(md), encoding="utf-8")
    (check.out / "results.json").write_text(
        json.dumps(
            {
                "environment": env,
                "ceilings": ceilings,
                "tests": tests,
                "sanitizer": sanitizer,
                "timings": rows,
                "verdict": verdict,
                "log": check.log,
            },
            indent=1,
        )
        + "\n",
        encoding="utf-8",
    )
    check.say("== stage 6: results in " + str(check.out) + f" ({plot_note})")
    print(table)
    print(f"verdict: {verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU tensors, tiny shapes, no sanitizer")
    parser.add_argument("--out", type=Path, required=True, help="the directory for results.md/json/png")
    parser.add_argument("--started", type=float, default=None, help="when stage 1 started (seconds since epoch)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run for the CPU version")
    started = args.started if args.started is not None else time.time()
    total = DRY_RUN_TOTAL_SECONDS if args.dry_run else TOTAL_SECONDS
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.dry_run, args.out, started + total, device, dtype)
    env = environment(check)
    check.say(
        f"GPU check on {env['device']}: torch {env['torch']}, triton {env['triton']}, {env['run']}; "
        f"backends {vitkern.available_backends()}"
    )
    torch.manual_seed(0)
    perf_model = start_perf_model(check)
    ceilings = stage_ceilings(check)
    tests = stage_tests(check)
    sanitizer = stage_sanitizer(check)
    rows = stage_timings(check, ceilings)
    estimate_note = add_estimates(check, perf_model, rows)
    check.say(f"stage 5: {estimate_note}")
    stage_results(check, env, ceilings, tests, sanitizer, rows, estimate_note)
    return 1 if check.failures else 0


if __name__ == "__main__":
    sys.exit(main())
