"""Registers, spills and shared memory of every vitkern GPU kernel for sm_80 and sm_90, without a GPU.

``python -m vitkern.tools.kernel_report [--arch 80,90] [--filter SUBSTR[|SUBSTR...]] [--jobs N] [--json PATH]
[--module MODULE ...] [--no-cuda]``

Triton kernels: every :class:`~vitkern.kernels._specs.KernelSpec` that a module of :data:`KERNEL_MODULES` lists in
its ``report_specs()`` is compiled by ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, which
needs neither a GPU nor the CUDA driver. Pointer arguments are compiled as 16-byte aligned, as a launch with tensors
from the PyTorch allocator specialises them. Spill stores, spill loads and the stack frame come from ptxas's own log
of that compilation; registers, local and static shared memory from ``cuobjdump --dump-resource-usage`` on the cubin.
Shared memory is the static size plus the dynamic size Triton launches the kernel with (``metadata.shared``). A
compiled kernel's ``n_regs`` and ``n_spills`` are filled in only when the driver loads it, so they are not used.

CUDA C++ kernels: ``cuobjdump --dump-resource-usage`` on the built extension ``vitkern/_C*.so`` gives registers,
stack frame, local and static shared memory per kernel and architecture (on sm_90 without the 1 KiB the driver
reserves per block, which the binary counts in). The binary carries no spill counts, so these kernels are checked on
local memory: the stack frame holds every spill (and any local array). Their dynamic shared memory is chosen at
launch and is not part of the binary. A missing extension is reported, not failed.

A row fails on a compile error, on spills or local memory, or on shared memory above the architecture's per-block
opt-in maximum (:data:`SHARED_MEMORY_LIMITS`). Exit status: 0 when every row passes, 1 when one fails or a kernel
module cannot be read, 2 on a usage error. Compiling for a GPU target needs Triton's compiler, not its interpreter,
so the report refuses to run under ``TRITON_INTERPRET=1`` (the test suite's setting on CPU-only machines).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import io
import itertools
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from vitkern.kernels._specs import KernelSpec

KERNEL_MODULES = ("vitkern.kernels.depthwise_conv", "vitkern.kernels.attention")
EXTENSION = "vitkern._C"
# Opt-in maximum of shared memory per block, in bytes: 163 KiB on sm_80 (A100), 227 KiB on sm_90 (H100).
SHARED_MEMORY_LIMITS = {80: 166912, 90: 232448}
# sm_90 binaries count the 1 KiB of shared memory the driver reserves per block in the static shared size of every
# kernel that uses shared memory; the limits above exclude it, so it is taken off.
RESERVED_SHARED_MEMORY = {90: 1024}
DEFAULT_ARCHS = (80, 90)
WARP_SIZE = 32
POINTER_DIVISIBILITY = 16
MAX_ERROR_LINES = 8

_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_CUOBJDUMP_ARCH = re.compile(r"^\s*arch = sm_(\d+)")
_CUOBJDUMP_FUNCTION = re.compile(r"^\s*Function (\S+):\s*$")
_CUOBJDUMP_FIELD = re.compile(r"(\w+(?:\[\d+\])?):(\d+)")


@dataclass
class KernelResources:
    """What one kernel (one config of it) uses when compiled for one architecture.

    kind: "triton" or "cuda". source: the kernel module, or the extension's file name. name: ``KernelSpec.name``
    or the demangled CUDA function. config: a Triton spec's pointer dtypes, constexprs, warps and stages ("" for
    CUDA). registers, spill_stores, spill_loads, stack, local: per thread (bytes except registers; spill counts are
    None where the binary does not carry them). shared: bytes per block, static + dynamic.
    """

    kind: str
    source: str
    name: str
    config: str
    arch: int
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int = 0
    local: int = 0
    shared: int = 0
    dtypes: tuple[str, ...] = ()
    seconds: float = 0.0
    error: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name}[{self.config}]" if self.config else self.name

    @property
    def shared_limit(self) -> int:
        return SHARED_MEMORY_LIMITS[self.arch]

    def problems(self) -> list[str]:
        """Why this row fails the report; empty when it passes."""
        if self.error is not None:
            return [f"error: {self.error}"]
        problems = []
        if self.spill_stores or self.spill_loads:
            problems.append(f"spills: {self.spill_stores} B stored, {self.spill_loads} B loaded per thread")
        elif self.stack or self.local:
            problems.append(f"local memory: {self.stack} B stack frame, {self.local} B local per thread")
        if self.shared > self.shared_limit:
            problems.append(f"shared memory {self.shared} B over the sm_{self.arch} limit of {self.shared_limit} B")
        return problems

    @property
    def ok(self) -> bool:
        return not self.problems()

    def to_json(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "label": self.label,
            "shared_limit": self.shared_limit,
            "problems": self.problems(),
        }


# --- Triton kernels -----------------------------------------------------------------------------------------------


def jit_function(fn: Any) -> JITFunction | InterpretedFunction:
    """The ``@triton.jit`` function under any ``triton.autotune`` / ``triton.heuristics`` wrappers.

    Under ``TRITON_INTERPRET=1`` that is an InterpretedFunction: its arguments can be read, it cannot be compiled.
    """
    inner = fn
    while not isinstance(inner, (JITFunction, InterpretedFunction)):
        if not hasattr(inner, "fn"):
            raise TypeError(f"fn: expected a @triton.jit function, got {type(fn).__name__}")
        inner = inner.fn
    return inner


def spec_dtypes(spec: KernelSpec) -> tuple[str, ...]:
    """The element types of a spec's pointer arguments, e.g. ("bf16", "fp32")."""
    return tuple(sorted({kind[1:] for kind in spec.signature.values() if kind.startswith("*")}))


def spec_config(spec: KernelSpec) -> str:
    """A spec's pointer dtypes in argument order (runs as "fp16x3"), constexprs, warps, stages and maxnreg."""
    pointers = (kind[1:] for kind in spec.signature.values() if kind.startswith("*"))
    runs = ((dtype, len(list(group))) for dtype, group in itertools.groupby(pointers))
    dtypes = ",".join(dtype if count == 1 else f"{dtype}x{count}" for dtype, count in runs)
    flags = " ".join(f"{name}={int(v) if isinstance(v, bool) else v}" for name, v in spec.constexprs.items())
    maxnreg = "" if spec.maxnreg is None else f" maxnreg={spec.maxnreg}"
    return f"{dtypes} {flags} warps={spec.num_warps} stages={spec.num_stages}{maxnreg}"


def spec_label(spec: KernelSpec) -> str:
    """``name[config]``: how the report names one spec (and what ``--filter`` matches)."""
    return f"{spec.name}[{spec_config(spec)}]"


def compile_inputs(
    spec: KernelSpec,
) -> tuple[JITFunction | InterpretedFunction, dict[str, str], dict[str, Any], dict[tuple[int], list]]:
    """``ASTSource``'s fn, signature (every argument in order, constexprs as "constexpr"), constexprs and attrs."""
    fn = jit_function(spec.fn)
    both = set(spec.signature) & set(spec.constexprs)
    if both:
        raise ValueError(f"{spec.name}: arguments {sorted(both)} are in both signature and constexprs")
    unknown = (set(spec.signature) | set(spec.constexprs)) - set(fn.arg_names)
    if unknown:
        raise ValueError(f"{spec.name}: {sorted(unknown)} are not arguments of {fn.__name__}{tuple(fn.arg_names)}")
    signature, attrs = {}, {}
    for index, arg in enumerate(fn.arg_names):
        if arg in spec.constexprs:
            signature[arg] = "constexpr"
        elif arg in spec.signature:
            signature[arg] = spec.signature[arg]
            if signature[arg].startswith("*") or arg in spec.aligned:
                attrs[(index,)] = [["tt.divisibility", POINTER_DIVISIBILITY]]
        else:
            raise ValueError(f"{spec.name}: argument {arg!r} of {fn.__name__} is in neither signature nor constexprs")
    return fn, signature, dict(spec.constexprs), attrs


def parse_ptxas_log(log: str) -> dict[str, int]:
    """stack, spill_stores and spill_loads (bytes per thread) from the ``ptxas -v`` log of one kernel."""
    found = _PTXAS_SPILLS.findall(log)
    if len(found) != 1:
        raise ValueError(f"log: expected the ptxas -v figures of exactly one kernel, found {len(found)} in {log!r}")
    stack, stores, loads = (int(v) for v in found[0])
    return {"stack": stack, "spill_stores": stores, "spill_loads": loads}


def compile_spec(spec: KernelSpec, arch: int) -> tuple[Any, str]:
    """Compile one spec for sm_``arch``; returns the compiled kernel and ptxas's log of that compilation."""
    fn, signature, constexprs, attrs = compile_inputs(spec)
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    if spec.maxnreg is not None:
        options["maxnreg"] = spec.maxnreg
    log = io.StringIO()
    with (
        tempfile.TemporaryDirectory(prefix="vitkern-kernel-report-") as cache_dir,
        knobs.cache.scope(),
        knobs.nvidia.scope(),
        contextlib.redirect_stdout(log),
    ):
        # An empty private cache: ptxas always runs (a cache hit would skip it and its log), and the user's cache
        # is not filled with binaries for GPUs this machine may not have.
        knobs.cache.dir = cache_dir
        knobs.nvidia.dump_ptxas_log = True  # Triton prints the ptxas -v log of the compilation
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, WARP_SIZE), options=options)
    return kernel, log.getvalue()


def spec_resources(spec: KernelSpec, arch: int, source: str = "") -> KernelResources:
    """Compile one spec for sm_``arch`` and read its figures; a compile failure becomes the row's error."""
    row = KernelResources("triton", source, spec.name, spec_config(spec), arch, dtypes=spec_dtypes(spec))
    start = time.perf_counter()
    try:
        kernel, log = compile_spec(spec, arch)
        figures = parse_ptxas_log(log)
        row.stack, row.spill_stores, row.spill_loads = figures["stack"], figures["spill_stores"], figures["spill_loads"]
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / f"{kernel.metadata.name}.cubin"
            cubin.write_bytes(kernel.asm["cubin"])
            usage = resource_usage(cubin)
        if len(usage) != 1:
            raise ValueError(f"cubin: expected one kernel in the cuobjdump resource usage, got {len(usage)}")
        fields = usage[0][2]
        row.registers, row.local = fields["REG"], fields["LOCAL"]
        row.shared = static_shared(arch, fields["SHARED"]) + kernel.metadata.shared
    except Exception as exc:  # noqa: BLE001 -- every failure is reported in its row, the other kernels go on
        row.error = "\n".join(f"{type(exc).__name__}: {exc}".splitlines()[:MAX_ERROR_LINES])
    row.seconds = time.perf_counter() - start
    return row


@cache
def module_specs(module: str) -> tuple[KernelSpec, ...]:
    """``report_specs()`` of a kernel module, checked: a non-empty list of KernelSpec."""
    report_specs = getattr(importlib.import_module(module), "report_specs", None)
    if report_specs is None:
        raise AttributeError(f"{module} defines no report_specs()")
    specs = tuple(report_specs())
    if not specs:
        raise ValueError(f"{module}.report_specs() returned no KernelSpec")
    wrong = sorted({type(spec).__name__ for spec in specs if not isinstance(spec, KernelSpec)})
    if wrong:
        raise TypeError(f"{module}.report_specs(): expected KernelSpec items, got {wrong}")
    return specs


def matches(label: str, name_filter: str | None) -> bool:
    """Whether ``label`` contains ``name_filter`` or, for ``a|b|c``, one of its alternatives (None: every label)."""
    return name_filter is None or any(part in label for part in name_filter.split("|"))


def load_specs(
    modules: Iterable[str], name_filter: str | None = None
) -> tuple[list[tuple[str, int, KernelSpec]], list[str]]:
    """(module, index, spec) of every spec whose name or config :func:`matches` ``name_filter``, and the modules'
    failures."""
    selected, failures = [], []
    for module in modules:
        try:
            specs = module_specs(module)
        except Exception as exc:  # noqa: BLE001 -- a module that cannot be read fails the report, others go on
            failures.append(f"{module}: cannot read its kernel specs ({type(exc).__name__}: {exc})")
            continue
        for index, spec in enumerate(specs):
            if matches(spec_label(spec), name_filter):
                selected.append((module, index, spec))
    return selected, failures


def _compile_task(task: tuple[str, int, int]) -> KernelResources:
    module, index, arch = task
    return spec_resources(module_specs(module)[index], arch, module)


def triton_report(
    modules: Iterable[str],
    archs: Sequence[int],
    name_filter: str | None = None,
    jobs: int = 1,
    progress: Callable[[int, int, KernelResources], None] | None = None,
) -> tuple[list[KernelResources], list[str]]:
    """Compile every selected spec for every arch (in ``jobs`` processes); rows in module, spec, arch order.
    ``progress(done, total, row)`` is called after each row."""
    selected, failures = load_specs(modules, name_filter)
    tasks = [(module, index, arch) for module, index, _ in selected for arch in archs]
    rows: list[KernelResources] = []

    def collect(results: Iterable[KernelResources]) -> None:
        for row in results:
            rows.append(row)
            if progress is not None:
                progress(len(rows), len(tasks), row)

    if jobs <= 1 or len(tasks) <= 1:
        collect(map(_compile_task, tasks))
        return rows, failures
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=context) as pool:
        collect(pool.map(_compile_task, tasks))
    return rows, failures


# --- cuobjdump and the CUDA C++ extension -------------------------------------------------------------------------


def cuobjdump_path() -> str:
    """cuobjdump: Triton's (``$TRITON_CUOBJDUMP_PATH`` or the one in its wheel), else the CUDA toolkit's."""
    candidates = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump"]
    with contextlib.suppress(RuntimeError):
        candidates.insert(0, Path(knobs.nvidia.cuobjdump.path))
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("cuobjdump")
    if found is None:
        raise FileNotFoundError(f"cuobjdump: not found in the triton wheel, in {candidates[-1].parent} or on PATH")
    return found


def parse_resource_usage(text: str) -> list[tuple[int | None, str, dict[str, int]]]:
    """(arch, function, fields) per function of ``cuobjdump --dump-resource-usage`` output.

    fields: REG, STACK, SHARED, LOCAL, CONSTANT[0], ... as printed. arch comes from the fatbin section headers
    ("arch = sm_90"); it is None for a bare cubin, which has none.
    """
    usage = []
    arch = None
    lines = text.splitlines()
    for number, line in enumerate(lines):
        if match := _CUOBJDUMP_ARCH.match(line):
            arch = int(match.group(1))
        elif (match := _CUOBJDUMP_FUNCTION.match(line)) and number + 1 < len(lines):
            fields = {key: int(value) for key, value in _CUOBJDUMP_FIELD.findall(lines[number + 1])}
            usage.append((arch, match.group(1), fields))
    return usage


def static_shared(arch: int, shared: int) -> int:
    """A kernel's own static shared memory (bytes per block) from the binary's figure for sm_``arch``."""
    return max(0, shared - RESERVED_SHARED_MEMORY.get(arch, 0))


def resource_usage(path: str | Path) -> list[tuple[int | None, str, dict[str, int]]]:
    """``cuobjdump --dump-resource-usage`` of a cubin, fatbin or shared library, parsed."""
    result = subprocess.run(
        [cuobjdump_path(), "--dump-resource-usage", str(path)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"cuobjdump --dump-resource-usage {path} failed: {result.stderr.strip()}")
    return parse_resource_usage(result.stdout)


def demangle(names: list[str]) -> list[str]:
    """C++ names through c++filt where it is installed, else as they are."""
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not names:
        return names
    result = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=False)
    demangled = result.stdout.splitlines()
    return demangled if result.returncode == 0 and len(demangled) == len(names) else names


def extension_path() -> Path | None:
    """The file of the built ``vitkern._C`` (found without importing it), or None where it was not built."""
    spec = importlib.util.find_spec(EXTENSION)
    return Path(spec.origin) if spec is not None and spec.origin else None


def cuda_report(
    path: str | Path, archs: Sequence[int], name_filter: str | None = None
) -> tuple[list[KernelResources], list[str]]:
    """Rows for every kernel of a CUDA binary compiled for one of ``archs``, and a failure per arch it lacks."""
    path = Path(path)
    usage = resource_usage(path)
    names = demangle([name for _, name, _ in usage])
    rows, seen = [], set()
    for (arch, _, fields), name in zip(usage, names):
        key = (arch, name, tuple(sorted(fields.items())))
        if arch not in archs or key in seen or not matches(name, name_filter):
            continue
        seen.add(key)
        rows.append(
            KernelResources(
                "cuda",
                path.name,
                name,
                "",
                arch,
                registers=fields["REG"],
                stack=fields["STACK"],
                local=fields["LOCAL"],
                shared=static_shared(arch, fields["SHARED"]),
            )
        )
    present = {arch for arch, _, _ in usage}
    failures = [f"{path.name}: no sm_{arch} kernels in it" for arch in archs if arch not in present]
    return rows, failures


# --- the report ---------------------------------------------------------------------------------------------------

_COLUMNS = ("kind", "kernel", "sm", "regs", "spill st/ld B", "stack B", "local B", "smem B", "limit B", "status")


def _cells(row: KernelResources) -> tuple[str, ...]:
    spills = "-" if row.spill_stores is None else f"{row.spill_stores}/{row.spill_loads}"
    registers = "-" if row.registers is None else str(row.registers)
    status = "; ".join(row.problems()) or "ok"
    return (
        row.kind,
        row.label,
        str(row.arch),
        registers,
        spills,
        str(row.stack),
        str(row.local),
        str(row.shared),
        str(row.shared_limit),
        status.replace("\n", " | "),
    )


def format_table(rows: Sequence[KernelResources]) -> str:
    """The rows as an aligned text table, one line per kernel config and arch."""
    table = [_COLUMNS, *(_cells(row) for row in rows)]
    widths = [max(len(line[column]) for line in table) for column in range(len(_COLUMNS) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[-1] for line in table
    )


# Per SM on sm_80 and sm_90: 64K 32-bit registers and at most 64 resident warps.
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
PROGRESS_EVERY_S = 5.0


def register_occupancy(registers: int | None) -> float | None:
    """The fraction of an SM's warp slots that the register file allows at ``registers`` per thread (other limits,
    shared memory and block size, can only lower it)."""
    if not registers:
        return None
    return min(MAX_WARPS_PER_SM, REGISTERS_PER_SM // (registers * WARP_SIZE)) / MAX_WARPS_PER_SM


_SUMMARY_COLUMNS = ("kind", "kernel", "configs", "max regs", "min occupancy", "spill B", "max smem B", "status")


def format_summary(rows: Sequence[KernelResources]) -> str:
    """One line per kernel family (kind and kernel name, every config and arch together): how many configs, the
    most registers, the lowest register-limited occupancy, the spill bytes, the most shared memory, failures."""
    families: dict[tuple[str, str], list[KernelResources]] = {}
    for row in rows:
        families.setdefault((row.kind, row.name), []).append(row)
    table = [_SUMMARY_COLUMNS]
    for (kind, name), members in families.items():
        registers = [row.registers for row in members if row.registers is not None]
        occupancies = [occ for occ in map(register_occupancy, registers) if occ is not None]
        spills = sum((row.spill_stores or 0) + (row.spill_loads or 0) for row in members)
        failing = sum(not row.ok for row in members)
        table.append(
            (
                kind,
                name,
                str(len({row.config for row in members})),
                str(max(registers)) if registers else "-",
                f"{min(occupancies):.0%}" if occupancies else "-",
                str(spills),
                str(max(row.shared for row in members)),
                f"{failing} failing" if failing else "ok",
            )
        )
    widths = [max(len(line[column]) for line in table) for column in range(len(_SUMMARY_COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table)


class Progress:
    """Prints ``compiled done/total`` to stderr at most every PROGRESS_EVERY_S seconds, and at the end."""

    def __init__(self) -> None:
        self.start = self.last = time.monotonic()

    def __call__(self, done: int, total: int, row: KernelResources) -> None:
        now = time.monotonic()
        if done == total or now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            print(
                f"kernel_report: compiled {done}/{total} Triton kernel configs ({now - self.start:.0f} s; last "
                f"{row.name} sm_{row.arch})",
                file=sys.stderr,
                flush=True,
            )


def _archs(text: str) -> tuple[int, ...]:
    try:
        archs = tuple(int(part) for part in text.split(","))
    except ValueError:
        archs = ()
    if not archs or any(arch not in SHARED_MEMORY_LIMITS for arch in archs):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(map(str, SHARED_MEMORY_LIMITS))}, got {text!r}"
        )
    return archs


def jobs_argument(text: str) -> int:
    """argparse type of the tools' --jobs: a positive number of processes."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of processes, got {text!r}")
    return int(text)


def add_jobs_argument(parser: argparse.ArgumentParser) -> None:
    """The tools' --jobs: compile processes, the machine's cores by default."""
    parser.add_argument(
        "--jobs", type=jobs_argument, default=os.cpu_count() or 1, help="compile processes (default: cores)"
    )


def refuse_interpreter(module: str) -> bool:
    """Whether TRITON_INTERPRET is set, which the tool ``module`` (``vitkern.tools.<name>``) cannot run under; when
    it is, says so on stderr with the command line to run instead."""
    if not knobs.runtime.interpret:
        return False
    print(
        f"{module.rsplit('.', 1)[-1]}: TRITON_INTERPRET is set, which turns @triton.jit functions into interpreted "
        f"ones that cannot be compiled for a GPU; run it without: env -u TRITON_INTERPRET python -m {module}",
        file=sys.stderr,
    )
    return True


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vitkern.tools.kernel_report",
        description="Registers, spills and shared memory of every vitkern GPU kernel, compiled without a GPU.",
    )
    parser.add_argument("--arch", type=_archs, default=DEFAULT_ARCHS, help="target archs, e.g. 80,90 (default)")
    parser.add_argument("--filter", help="only kernels whose name or config contains this substring (or one of a|b|c)")
    add_jobs_argument(parser)
    parser.add_argument("--json", type=Path, help="also write the rows and failures to this JSON file")
    parser.add_argument(
        "--module", action="append", help=f"a Triton kernel module to report (repeatable; default {KERNEL_MODULES})"
    )
    parser.add_argument("--no-cuda", action="store_true", help="leave out the CUDA C++ extension")
    parser.add_argument("--summary", action="store_true", help="print the per-family summary only, not every config")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the report; returns the exit status (0 all within limits, 1 a failure, 2 a usage error)."""
    args = _parser().parse_args(argv)
    if refuse_interpreter("vitkern.tools.kernel_report"):
        return 2
    modules = tuple(args.module) if args.module else KERNEL_MODULES
    rows, failures = triton_report(modules, args.arch, args.filter, args.jobs, progress=Progress())
    extension = None if args.no_cuda else extension_path()
    if extension is not None:
        try:
            cuda_rows, cuda_failures = cuda_report(extension, args.arch, args.filter)
        except (OSError, RuntimeError) as exc:
            cuda_rows, cuda_failures = [], [f"{extension.name}: {exc}"]
        rows += cuda_rows
        failures += cuda_failures
    if not rows:
        failures.append(f"no kernel matches --filter {args.filter!r}" if args.filter else "no kernel to report")
    failing = [row for row in rows if not row.ok]
    print(f"{len(rows)} rows (kernel config x arch), {len(failing)} failing, {len(failures)} other failures")
    for failure in failures:
        print(f"FAILED: {failure}")
    print()
    print(format_summary(rows))
    print()
    if args.summary:
        print("per-config table: left out (--summary); run without it, or with --json, for every config")
    else:
        print(format_table(rows))
    if args.no_cuda:
        print("CUDA C++ kernels: left out (--no-cuda)")
    elif extension is None:
        print(f"CUDA C++ kernels: {EXTENSION} is not built (no vitkern/_C*.so), so its kernels are not reported")
    else:
        print(f"CUDA C++ kernels: read from {extension}")
    ok = not failing and not failures
    if args.json is not None:
        report = {
            "archs": list(args.arch),
            "modules": list(modules),
            "cuda_extension": None if extension is None else str(extension),
            "rows": [row.to_json() for row in rows],
            "failures": failures,
            "ok": ok,
        }
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
