"""A speed estimate of every vitkern GPU kernel at the benchmark shapes, from its sm_90 SASS, without a GPU.

``python -m vitkern.tools.perf_model [--quick | --headline] [--filter SUBSTR] [--device h100,h200]
[--backend triton|cuda] [--jobs N] [--json PATH] [--markdown]``

For every benchmark shape (:data:`CONV_SHAPES`, :data:`ATTENTION_CASES`, as in ``benchmarks/``), dtype, memory
format and backend, one training step's kernel launches (forward, then every backward kernel) are modelled:

* **What runs.** Triton: the launcher itself (``vitkern.kernels.*``) is called on ``meta`` tensors with every
  ``@triton.jit`` kernel's launch intercepted, so the grid, constexprs, warps, stages and the specialisation of
  integer arguments (1 becomes a constant, multiples of 16 are marked divisible, as Triton's launcher does) are the
  ones it would launch; that variant is compiled for sm_90 (kept in :func:`cache_dir` between runs). CUDA C++: the op
  ``depthwise_conv2d_plan`` of the built extension, which lives beside the launcher, names each launch's template
  instance, grid, block and dynamic shared memory; the SASS is that function's in ``vitkern/_C*.so``.
* **Instruction mix.** ``cuobjdump -sass`` of the function; loops are backward branches, the hot loop the one whose
  own body (nested loops left out) does the most multiply-adds (:mod:`vitkern.tools._sass`). The table's FMA share
  is the hot loop's (a kernel without a loop, straight-line code such as the forward's unrolled row kernel: its
  whole body's).
* **What executes, Triton.** The hot loop's iterations over the whole grid, from the loop bounds the kernel source
  gives and the launch arguments: ``cdiv(KH*KW, BLOCK_T)`` per program for the depthwise forward and dx,
  ``N * cdiv(P, BLOCK_P)`` per channel (and tap) block for the split reductions (epilogue backward, dweight),
  ``cdiv(NK, BLOCK_N)`` per query block for the attention forward and dq, ``cdiv(NQ, BLOCK_M)`` per key block for
  dk/dv, and for the table gradient (x-block pairs whose offsets reach the program's bins) x batch chunk x query rows
  of the program's row offset. Every instruction outside the hot loop counts once per program:
  ``warp_instructions = warps_per_block * (hot_iterations * hot_body + blocks * rest)``.
* **What executes, CUDA C++.** Counted, not assumed: each basic block of the SASS (:func:`_sass.control_flow`) is
  weighted by how many times the launch's warps run it, ``warp_instructions = sum over blocks b of runs(b) *
  len(b)``. ``runs`` comes from executing the kernel's SASS on the launch's own arguments
  (:func:`_sass.run_block`): integer, predicate and branch instructions for every thread of a block, 32 lanes a
  warp, a split warp running each side and meeting again at the branch's immediate post-dominator (a warp runs a
  block when one of its lanes is active, and issues all of it, guarded-off instructions included); loads return 0,
  which only data would notice (the depthwise kernels branch on their arguments and thread indices alone). So
  every loop runs its real trip count (tile loads, per-row loops, the hot loop, with the lanes and warps past the
  tile's edge idle or exited), and branches the launch does not take (an epilogue's activation, scale, shift and
  residual when they are null, the load modes the tile does not use, the edge cases of interior tiles) count zero.
  The arguments are the launchers' own: :data:`ARGUMENTS_CPP`, a host program compiled against
  csrc/depthwise_conv_kernels.cuh, runs their planning (tilings, load modes, items per block) and packs each
  launch's parameters as the CUDA ABI does; its launches must equal the plan op's (``depthwise_conv2d_plan``),
  name, grid, block and shared memory. Not every block is executed (:func:`_sass.sample_blocks`): along x (the
  tiles of the forward and dx, the item ranges of dweight) all of up to 3, else the first, the second (standing for
  the interior ones) and the last; along y and z (channel blocks, images, tap chunks), which differ only at the
  last, all of up to 2, else the first (standing for all but the last) and the last. Results are kept in
  :func:`cache_dir`. Why execution rather than trip counts read off the source: the trip counts of the inner loops
  (tile loads split and unrolled by the compiler, loops over planes, items and slots) and which branch an epilogue
  takes depend on the tiling, which the plan op does not report, and on compiler transformations that the source
  does not show; executing the SASS needs neither.
* **Occupancy.** Blocks per SM = the fewest that registers (allocated per warp in units of 256), shared memory (plus
  the 1 KiB the driver reserves per block), threads and the 32-block limit allow on sm_90 (:data:`SM90`).
* **Floors**, from the shape alone: ``memory_us`` = the bytes each of the launch's inputs is read once and each
  output written once, over DRAM bandwidth; ``math_us`` = the useful multiply-adds over the rate of the unit that
  must do them (the fp32 FMA pipe for depthwise convolution, which accumulates in fp32, and for fp32 attention,
  whose dots are exact; tensor cores for fp16 / bf16 attention). ``floor_us = max(memory_us, math_us)``.
* **Estimate.** ``estimate_us = max(memory_us, tensor_us, issue_us)``: ``tensor_us`` = the executed tensor-core
  multiply-adds (Triton: hot loop x trips; CUDA C++: of every block run) over the tensor-core rate, ``issue_us =
  waves * resident * warps_per_block * instructions_per_warp / (ISSUE_RATE * clock * efficiency)`` where
  ``resident = min(blocks_per_sm, ceil(blocks / SMs))``, ``waves = ceil(blocks / (SMs * resident))``,
  ``efficiency = min(1, resident * warps_per_block / SATURATING_WARPS)`` and ``instructions_per_warp =
  warp_instructions / (blocks * warps_per_block)``. FFMA and HFMA2 issue at the issue rate, so their math time is
  inside ``issue_us``.

This is a model, not a measurement: caches, bank conflicts, latency chains and DRAM traffic beyond the floor are not
in it. ``benchmarks/`` measures on a GPU. Refuses to run under ``TRITON_INTERPRET=1``, as the kernel report does.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib
import inspect
import json
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import triton
from triton import knobs
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend, CUDAOptions
from triton.compiler import ASTSource
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from vitkern.kernels._specs import TRITON_DTYPES, KernelSpec
from vitkern.tools import _sass
from vitkern.tools.cases import AttentionCase
from vitkern.tools.kernel_report import (
    add_jobs_argument,
    compile_inputs,
    demangle,
    extension_path,
    refuse_interpreter,
    resource_usage,
    static_shared,
)

ARCH = 90


# --- hardware -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    """Peak rates of one GPU: SMs, the clock the fp32 rate implies, DRAM bytes/s, multiply-adds/s by unit."""

    name: str
    sms: int
    clock_hz: float
    dram_bytes_per_s: float
    fp32_fma_per_s: float
    tensor_fma_per_s: dict[str, float]


# NVIDIA H100 Tensor Core GPU datasheet (H100 SXM): 132 SMs, 3.35 TB/s HBM3, FP32 67 TFLOPS, TF32 tensor 494.7
# TFLOPS dense (989 with sparsity), FP16 / BF16 tensor 989.4 TFLOPS dense. 67 TFLOPS = 132 SMs x 128 FP32 lanes x
# 2 FLOP x 1.98 GHz, the boost clock (NVIDIA H100 whitepaper: 128 FP32 cores per SM). H200 datasheet (H200 SXM):
# the same GH100 compute, 4.8 TB/s HBM3e. The fp32 FMA rate is derived from lanes and clock, so a kernel of nothing
# but FFMA issuing at ISSUE_RATE reaches it exactly.
H100_SMS = 132
H100_CLOCK_HZ = 1.98e9
FP32_LANES_PER_SM = 128
_FP32_FMA_PER_S = H100_SMS * FP32_LANES_PER_SM * H100_CLOCK_HZ
_H100_TENSOR = {"fp16": 989.4e12 / 2, "bf16": 989.4e12 / 2, "tf32": 494.7e12 / 2}
DEVICES = {
    "h100": Device("H100 SXM", H100_SMS, H100_CLOCK_HZ, 3.35e12, _FP32_FMA_PER_S, _H100_TENSOR),
    "h200": Device("H200 SXM", H100_SMS, H100_CLOCK_HZ, 4.8e12, _FP32_FMA_PER_S, _H100_TENSOR),
}
# Warp instructions issued per clock per SM: 4 schedulers, one instruction each (NVIDIA H100 whitepaper, "H100 SM
# architecture": four partitions, each with a warp scheduler and dispatch unit issuing one warp instruction a clock).
ISSUE_RATE = 4
# Warps per SM that keep all 4 schedulers issuing without instruction-level parallelism: 4 per scheduler, the fp32
# FMA's dependent-issue latency in cycles (Jia et al., "Dissecting the NVIDIA Volta GPU Architecture via
# Microbenchmarking", arXiv:1804.06826, table 4.1; Hopper keeps it, Luo et al., arXiv:2402.13499).
SATURATING_WARPS = 16


@dataclass(frozen=True)
class SmLimits:
    """Per-SM resource limits (CUDA C++ Programming Guide, "Compute Capabilities", technical specifications)."""

    registers: int = 65536
    register_unit: int = 256  # registers are allocated per warp in units of 256
    max_registers_per_thread: int = 255
    shared_bytes: int = 233472  # 228 KiB per SM
    reserved_shared_per_block: int = 1024  # the driver's 1 KiB per block
    threads: int = 2048
    blocks: int = 32


SM90 = SmLimits()


def blocks_per_sm(registers: int, shared_bytes: int, threads_per_block: int, limits: SmLimits = SM90) -> int:
    """Resident blocks per SM of a kernel: ``registers`` per thread, ``shared_bytes`` (static + dynamic) per block."""
    if threads_per_block < 1 or threads_per_block > limits.threads:
        raise ValueError(f"threads_per_block: expected 1 to {limits.threads}, got {threads_per_block}")
    if registers < 0 or registers > limits.max_registers_per_thread:
        raise ValueError(f"registers: expected 0 to {limits.max_registers_per_thread}, got {registers}")
    warps = math.ceil(threads_per_block / _sass.WARP_SIZE)
    per_warp = math.ceil(max(registers, 1) * _sass.WARP_SIZE / limits.register_unit) * limits.register_unit
    by_registers = (limits.registers // per_warp) // warps
    by_shared = limits.shared_bytes // (shared_bytes + limits.reserved_shared_per_block)
    by_threads = limits.threads // (warps * _sass.WARP_SIZE)
    return min(by_registers, by_shared, by_threads, limits.blocks)


# --- shapes -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvShape:
    """One depthwise layer of ``benchmarks/test_depthwise_conv.py`` at its GPU batch: square map and kernel."""

    name: str
    batch: int
    channels: int
    size: int
    kernel: int
    convmixer_epilogue: bool  # GELU, folded BatchNorm (scale, shift) and residual; else bias only


CONV_SHAPES = (
    ConvShape("convmixer_1536_20", 64, 1536, 32, 9, True),
    ConvShape("convmixer_768_32", 64, 768, 32, 7, True),
    ConvShape("convnext_t_stage1", 64, 96, 56, 7, False),
    ConvShape("convnext_t_stage2", 64, 192, 28, 7, False),
    ConvShape("convnext_t_stage3", 64, 384, 14, 7, False),
    ConvShape("convnext_t_stage4", 64, 768, 7, 7, False),
    ConvShape("replknet_31b_stage1", 64, 128, 56, 31, False),
)
ATTENTION_CASES = (
    AttentionCase("coatnet0_s3", "rel_pos", 64, 12, 14, 32, 32),
    AttentionCase("coatnet0_s4", "rel_pos", 64, 24, 7, 32, 32),
    AttentionCase("swin_t_windows", "rel_pos", 64 * 64, 3, 7, 32, 32),
    AttentionCase("levit128s_s1", "levit", 128, 4, 14, 16, 32),
    AttentionCase("levit128s_shrink1", "levit", 128, 8, 14, 16, 64, stride=2),
    AttentionCase("levit128s_s2", "levit", 128, 6, 7, 16, 32),
    AttentionCase("levit128s_shrink2", "levit", 128, 16, 7, 16, 64, stride=2),
    AttentionCase("levit128s_s3", "levit", 128, 8, 4, 16, 32),
    AttentionCase("levit256_s1", "levit", 128, 4, 14, 32, 64),
    AttentionCase("levit256_shrink1", "levit", 128, 8, 14, 32, 128, stride=2),
    AttentionCase("levit256_s2", "levit", 128, 6, 7, 32, 64),
    AttentionCase("levit256_s3", "levit", 128, 8, 4, 32, 64),
    AttentionCase("long_4096", "rel_pos", 4, 8, 64, 64, 64),
)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
# --quick: what the test suite runs, one shape of each op family.
QUICK = {"shapes": ("convnext_t_stage2", "levit128s_s3"), "dtypes": ("fp16",), "layouts": ("nchw",)}
# --headline: the README's table, the shapes the issue tracks, fp16.
HEADLINE = {
    "shapes": (
        "convmixer_1536_20",
        "convnext_t_stage2",
        "replknet_31b_stage1",
        "coatnet0_s3",
        "swin_t_windows",
        "levit128s_s1",
        "levit128s_shrink1",
    ),
    "dtypes": ("fp16",),
    "layouts": tuple(LAYOUTS),
}
GELU = 1  # vitkern.ops.depthwise_conv.ACTIVATION_CODES["gelu"]


# --- one kernel launch ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Work:
    """What a launch must do at least: DRAM bytes (inputs read once, outputs written once), useful multiply-adds and
    the unit that must do them ("fp32" FMA pipe, or a tensor-core dtype "fp16" / "bf16" / "tf32")."""

    read_bytes: int
    write_bytes: int
    macs: int
    unit: str


@dataclass(frozen=True)
class Code:
    """A compiled kernel as the model sees it: hot-loop mix, the mix of everything else, registers, static shared."""

    hot: _sass.Mix
    rest: _sass.Mix
    registers: int
    static_shared: int
    outer: _sass.Mix | None = None  # the loop around the hot loop, its own instructions (Triton; None: no such loop)


@dataclass(frozen=True)
class Executed:
    """What a launch's warps issue, summed over its whole grid: warp instructions by class, the multiply-adds they
    do and, of those, the tensor-core ones by precision."""

    counts: dict[str, float]
    macs: float
    tensor_macs: dict[str, float]
    hot_iterations: float = 0.0  # runs of the hot loop's branch back, by all warps

    @property
    def total(self) -> float:
        return sum(self.counts.values())


@dataclass(frozen=True)
class Launch:
    """One launch: its kernel, grid size in blocks, warps per block, dynamic shared memory and the hot loop's
    iterations (over the whole grid for Triton, per warp for CUDA C++: ``per_warp``); ``executed``, where the
    kernel was executed (CUDA C++), is what its warps issue, and replaces the hot-loop-and-rest count."""

    kernel: str
    code: Code
    blocks: int
    warps_per_block: int
    dynamic_shared: int
    hot_iterations: float
    per_warp: bool
    work: Work
    executed: Executed | None = None
    outer_iterations: float | None = None  # Triton: runs of the loop around the hot loop over the grid, if known

    def _parts(self) -> list[tuple[_sass.Mix, float]]:
        """(mix, runs per warp of the grid's warps summed) of the hot loop, the loop around it and the rest; code
        of the loop around the hot loop counts once per program where its trip count is not given."""
        warps = self.warps_per_block
        if self.per_warp:
            return [(self.code.hot, self.hot_iterations * self.blocks * warps), (self.code.rest, self.blocks * warps)]
        parts = [(self.code.hot, self.hot_iterations * warps), (self.code.rest, self.blocks * warps)]
        if self.code.outer is not None:
            runs = self.blocks if self.outer_iterations is None else self.outer_iterations
            parts.append((self.code.outer, runs * warps))
        return parts

    def warp_instructions(self) -> float:
        if self.executed is not None:
            return self.executed.total
        return sum(mix.total * runs for mix, runs in self._parts())

    def tensor_macs(self) -> dict[str, float]:
        """Executed tensor-core multiply-adds by precision."""
        if self.executed is not None:
            return dict(self.executed.tensor_macs)
        totals: dict[str, float] = {}
        for mix, runs in self._parts():
            for precision, macs in mix.tensor_macs.items():
                totals[precision] = totals.get(precision, 0) + macs * runs
        return totals

    def blocks_per_sm(self) -> int:
        return blocks_per_sm(
            self.code.registers, self.code.static_shared + self.dynamic_shared, self.warps_per_block * _sass.WARP_SIZE
        )


def estimate(launch: Launch, device: Device) -> dict[str, float]:
    """memory_us, math_us, floor_us, tensor_us, issue_us, estimate_us of one launch (module docstring)."""
    work = launch.work
    memory_us = (work.read_bytes + work.write_bytes) / device.dram_bytes_per_s * 1e6
    rate = device.fp32_fma_per_s if work.unit == "fp32" else device.tensor_fma_per_s[work.unit]
    math_us = work.macs / rate * 1e6
    tensor_us = sum(macs / device.tensor_fma_per_s[p] for p, macs in launch.tensor_macs().items()) * 1e6
    per_sm = launch.blocks_per_sm()
    if per_sm < 1:
        issue_us = math.inf
    else:
        resident = min(per_sm, math.ceil(launch.blocks / device.sms))
        waves = math.ceil(launch.blocks / (device.sms * resident))
        per_warp = launch.warp_instructions() / (launch.blocks * launch.warps_per_block)
        efficiency = min(1.0, resident * launch.warps_per_block / SATURATING_WARPS)
        issue_us = (
            waves * resident * launch.warps_per_block * per_warp / (ISSUE_RATE * device.clock_hz * efficiency) * 1e6
        )
    return {
        "memory_us": memory_us,
        "math_us": math_us,
        "floor_us": max(memory_us, math_us),
        "tensor_us": tensor_us,
        "issue_us": issue_us,
        "estimate_us": max(memory_us, tensor_us, issue_us),
    }


# --- Triton: intercepted launches ---------------------------------------------------------------------------------


@dataclass
class TritonCall:
    """A launch the launcher made: the kernel, its grid, every argument by name and the launch options."""

    fn: JITFunction | InterpretedFunction
    grid: tuple[int, ...]
    args: dict[str, Any]
    options: dict[str, Any]
    label: str = ""  # the table's kernel name where it is not the function's (a kernel serving two roles)

    @property
    def kernel(self) -> str:
        return self.label or self.fn.__name__.strip("_").removesuffix("_kernel")


_OPTION_NAMES = ("num_warps", "num_stages", "maxnreg", "num_ctas")


@contextlib.contextmanager
def intercept_launches(module: Any) -> Iterator[list[TritonCall]]:
    """Within the block, launches of the module's ``@triton.jit`` kernels are recorded, not run."""
    calls: list[TritonCall] = []
    kernels = [value for value in vars(module).values() if isinstance(value, (JITFunction, InterpretedFunction))]

    def recorder(fn: JITFunction | InterpretedFunction) -> Callable[..., None]:
        def run(*args: Any, grid: Any, warmup: bool = False, **kwargs: Any) -> None:
            options = {name: kwargs.pop(name) for name in _OPTION_NAMES if name in kwargs}
            bound = inspect.signature(fn.fn).bind(*args, **kwargs)
            bound.apply_defaults()
            values = dict(bound.arguments)
            grid = grid(values) if callable(grid) else grid
            calls.append(TritonCall(fn, tuple(int(g) for g in grid), values, options))

        return run

    for fn in kernels:
        fn.run = recorder(fn)
    try:
        yield calls
    finally:
        for fn in kernels:
            del fn.run


def _params(fn: JITFunction | InterpretedFunction) -> list[tuple[str, bool, bool]]:
    """(name, is constexpr, do not specialize) of each argument; read from the signature under the interpreter,
    whose functions do not carry Triton's KernelParam list."""
    if isinstance(fn, JITFunction):
        return [(p.name, p.is_constexpr, p.do_not_specialize) for p in fn.params]
    fixed = set(fn.kwargs.get("do_not_specialize") or ())
    return [
        (p.name, "constexpr" in str(p.annotation), p.name in fixed)
        for p in inspect.signature(fn.fn).parameters.values()
    ]


POINTER_DTYPES = {**TRITON_DTYPES, torch.int32: "i32"}


def launch_spec(call: TritonCall) -> KernelSpec:
    """The KernelSpec of exactly the variant Triton's launcher would compile for this call."""
    signature, constexprs, aligned = {}, {}, []
    for name, is_constexpr, fixed in _params(call.fn):
        value = call.args[name]
        if is_constexpr:
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = f"*{POINTER_DTYPES[value.dtype]}"
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            kind, attr = native_specialize_impl(CUDABackend, value, False, not fixed, True)
            if kind == "constexpr":
                constexprs[name] = value
            else:
                signature[name] = kind
                if attr == "D":
                    aligned.append(name)
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{call.fn.__name__}: argument {name}: unexpected {type(value).__name__}")
    return KernelSpec(
        call.fn.__name__,
        call.fn,
        signature,
        constexprs,
        num_warps=call.options.get("num_warps", CUDAOptions.num_warps),
        num_stages=call.options.get("num_stages", CUDAOptions.num_stages),
        maxnreg=call.options.get("maxnreg"),
        aligned=tuple(aligned),
    )


def spec_key(spec: KernelSpec) -> str:
    """A stable text key of a spec (what compiles to the same binary)."""
    return repr(
        (
            spec.fn.__module__,
            spec.name,
            sorted(spec.signature.items()),
            sorted(spec.constexprs.items()),
            spec.num_warps,
            spec.num_stages,
            spec.maxnreg,
            spec.aligned,
        )
    )


def code_of_function(function: _sass.Function, registers: int, static_shared_bytes: int) -> Code:
    """The hot loop's mix, the mix of the loop directly around it (its own instructions, other loops in it left
    out; None where the hot loop is outermost) and the rest."""
    hot = function.hot_loop()
    if hot is None:
        return Code(_sass.Mix.of([]), function.mix(), registers, static_shared_bytes)
    around = [
        loop
        for loop in function.loops()
        if loop.start <= hot.start and hot.end <= loop.end and (loop.start, loop.end) != (hot.start, hot.end)
    ]
    outer = min(around, key=lambda loop: loop.end - loop.start) if around else None
    span = (outer.start, outer.end) if outer else (hot.start, hot.end)
    rest = [ins for ins in function.instructions if not span[0] <= ins.address <= span[1]]
    hot_body = [ins for ins in function.instructions if hot.start <= ins.address <= hot.end]
    if outer is None:
        return Code(_sass.Mix.of(hot_body), _sass.Mix.of(rest), registers, static_shared_bytes)
    inside = [
        ins
        for ins in function.instructions
        if outer.start <= ins.address <= outer.end and not hot.start <= ins.address <= hot.end
    ]
    return Code(_sass.Mix.of(hot_body), _sass.Mix.of(rest), registers, static_shared_bytes, _sass.Mix.of(inside))


def cache_dir() -> Path:
    """Where compiled sm_90 variants are kept between runs: ``$VITKERN_PERF_MODEL_CACHE``, else
    ``~/.cache/vitkern/perf_model`` (apart from Triton's own cache, which holds binaries for this machine's GPU)."""
    default = Path.home() / ".cache" / "vitkern" / "perf_model"
    return Path(os.environ.get("VITKERN_PERF_MODEL_CACHE", default))


def compile_code(spec: KernelSpec) -> tuple[Code, int]:
    """Compile a spec for sm_90 (or take it from :func:`cache_dir`): its Code and the dynamic shared memory Triton
    launches it with."""
    fn, signature, constexprs, attrs = compile_inputs(spec)
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    if spec.maxnreg is not None:
        options["maxnreg"] = spec.maxnreg
    with knobs.cache.scope():
        knobs.cache.dir = str(cache_dir())
        kernel = triton.compile(source, target=GPUTarget("cuda", ARCH, _sass.WARP_SIZE), options=options)
    with tempfile.TemporaryDirectory(prefix="vitkern-perf-model-") as tmp:
        cubin = Path(tmp) / f"{kernel.metadata.name}.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        functions = _sass.dump_sass(cubin)
        usage = resource_usage(cubin)
    if len(functions) != 1 or len(usage) != 1:
        raise ValueError(f"{spec.name}: expected one function in the cubin, got {len(functions)}")
    fields = usage[0][2]
    return code_of_function(functions[0], fields["REG"], static_shared(ARCH, fields["SHARED"])), kernel.metadata.shared


# --- Triton: the work and trip counts of each kernel --------------------------------------------------------------


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensor_bytes(args: dict[str, Any], names: Sequence[str]) -> int:
    return sum(_nbytes(args[name]) for name in names)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _triton_dwconv(call: TritonCall) -> tuple[Work, float]:
    """Work and total hot-loop iterations of a depthwise-convolution kernel launch."""
    a = call.args
    programs = math.prod(call.grid)
    name = call.fn.__name__
    if name in ("_dwconv_fwd_kernel", "_dwconv_fwd_rows_kernel", "_dwconv_fwd_cl_kernel"):
        flags = (("bias", "HAS_BIAS"), ("scale", "HAS_SCALE"), ("shift", "HAS_SHIFT"), ("res", "HAS_RESIDUAL"))
        reads = ["x_ptr", "w_ptr"] + [f"{v}_ptr" for v, flag in flags if a[flag]]
        writes = ["y_ptr"] + (["z_ptr"] if a["SAVE_Z"] else [])
        work = Work(_tensor_bytes(a, reads), _tensor_bytes(a, writes), a["y_ptr"].numel() * a["KH"] * a["KW"], "fp32")
        if name == "_dwconv_fwd_rows_kernel":
            # the hot loop runs once per image of each program's range
            tiles, groups = call.grid
            per = a["images_per_program"]
            return work, tiles * sum(min(per, a["N"] - g * per) for g in range(groups))
        if name == "_dwconv_fwd_cl_kernel":
            # one tap per iteration of the column loop, inside the loop over kernel rows
            return work, (programs * a["KH"] * a["KW"], programs * a["KH"])
        return work, programs * _cdiv(a["KH"] * a["KW"], a["BLOCK_T"])
    if name == "_dwconv_bwd_epilogue_kernel":
        reads = (
            ["dy_ptr"]
            + (["z_ptr"] if a["ACTIVATION"] or a["HAS_SCALE"] else [])
            + (["scale_ptr"] if a["HAS_SCALE"] else [])
        )
        writes = (["gz_ptr"] if a["STORE_GZ"] else []) + (["partial_ptr"] if a["REDUCE"] else [])
        iterations = a["N"] * _cdiv(a["P"], a["BLOCK_P"])
        channel_blocks = programs // a["num_splits"]
        return Work(_tensor_bytes(a, reads), _tensor_bytes(a, writes), 0, "fp32"), channel_blocks * iterations
    if name == "_dwconv_bwd_input_kernel":
        macs = a["gz_ptr"].numel() * a["KH"] * a["KW"]
        return Work(
            _tensor_bytes(a, ["gz_ptr", "w_ptr"]), _tensor_bytes(a, ["dx_ptr"]), macs, "fp32"
        ), programs * _cdiv(a["KH"] * a["KW"], a["BLOCK_T"])
    if name == "_dwconv_bwd_weight_kernel":
        macs = a["gz_ptr"].numel() * a["KH"] * a["KW"]
        iterations = a["N"] * _cdiv(a["OH"] * a["OW"], a["BLOCK_P"])
        block_programs = programs // a["num_splits"]
        return Work(
            _tensor_bytes(a, ["x_ptr", "gz_ptr"]), _tensor_bytes(a, ["partial_ptr"]), macs, "fp32"
        ), block_programs * iterations
    raise ValueError(f"kernel: no work model for {name}")


def _table_iterations(a: dict[str, Any], grid: tuple[int, ...]) -> int:
    """Hot-loop (query row) iterations of ``_attention_bwd_table_kernel`` over its grid, its loops replayed."""
    heads, num_dy, g_programs = grid
    num_g_blocks = _cdiv(a["num_bins"], a["BLOCK_G"])
    bx, q_step, qgw, kgw, qgh, kgh = (
        a["BLOCK_X"],
        a["q_step"],
        a["q_grid_w"],
        a["k_grid_w"],
        a["q_grid_h"],
        a["k_grid_h"],
    )
    total = 0
    for pid_dy in range(num_dy):
        if a["BIAS_MODE"] == 1:
            dy = pid_dy - (a["win_h"] - 1)
            rows = max(0, min(qgh, qgh + dy) - max(0, dy))
        else:
            n_plus = min(qgh, (kgh - 1 - pid_dy) // q_step + 1)
            n_minus = max(0, qgh - _cdiv(pid_dy, q_step)) if pid_dy > 0 else 0
            rows = n_plus + n_minus
        for pid_g in range(g_programs):
            g0 = (pid_g % num_g_blocks) * a["BLOCK_G"]
            b_lo = (pid_g // num_g_blocks) * a["batch_per_chunk"]
            batches = max(0, min(a["B"], b_lo + a["batch_per_chunk"]) - b_lo)
            pairs = 0
            for xq0 in range(0, qgw, bx):
                for xk0 in range(0, kgw, bx):
                    lo, hi = xq0 * q_step - (xk0 + bx - 1), (xq0 + bx - 1) * q_step - xk0
                    if a["BIAS_MODE"] == 1:
                        bin_lo, bin_hi = lo + kgw - 1, hi + kgw - 1
                    else:
                        bin_lo = 0 if lo <= 0 <= hi else min(abs(lo), abs(hi))
                        bin_hi = max(abs(lo), abs(hi))
                    pairs += bin_lo < g0 + a["BLOCK_G"] and bin_hi >= g0
            total += pairs * batches * rows
    return heads * total


def _chunk_entries(batch: int, chunks: int, per_chunk: int) -> int:
    """Batch entries the chunks of a short attention kernel cover, chunk c holding [c * per_chunk, ...) of batch."""
    return sum(max(0, min(batch, c * per_chunk + per_chunk) - c * per_chunk) for c in range(chunks))


def _triton_attention(call: TritonCall) -> tuple[Work, float]:
    """Work and total hot-loop iterations of an attention kernel launch."""
    a = call.args
    programs = math.prod(call.grid)
    name = call.fn.__name__
    if name == "_attention_bins_kernel":
        work = Work(_tensor_bytes(a, ["ds_ptr", "index_ptr"]), _tensor_bytes(a, ["grad_ptr"]), 0, "fp32")
        return work, programs * _cdiv(a["SLOTS"], a["BLOCK_S"])
    q = a["q_ptr"]
    batch, heads, nq, d = q.shape
    nk, dv = a["NK"], a["DV"]
    pairs = batch * heads * nq * nk
    unit = "fp32" if q.dtype == torch.float32 else TRITON_DTYPES[q.dtype]
    bias = ["bias_ptr"] if a["BIAS_MODE"] else []
    if name == "_attention_fwd_short_kernel":
        work = Work(
            _tensor_bytes(a, ["q_ptr", "k_ptr", "v_ptr", *bias]),
            _tensor_bytes(a, ["out_ptr", "lse_ptr"]),
            pairs * (d + dv),
            unit,
        )
        q_blocks, heads, chunks = call.grid
        entries = q_blocks * heads * _chunk_entries(batch, chunks, a["batch_per_chunk"])
        if a["ONE_KEY_TILE"]:
            return work, entries  # the loop over the chunk's batch entries is the hot loop
        return work, (entries * _cdiv(nk, a["BLOCK_N"]), entries)
    if name == "_attention_fwd_kernel":
        work = Work(
            _tensor_bytes(a, ["q_ptr", "k_ptr", "v_ptr", *bias]),
            _tensor_bytes(a, ["out_ptr", "lse_ptr"]),
            pairs * (d + dv),
            unit,
        )
        return work, programs * _cdiv(nk, a["BLOCK_N"])
    saved = ["dout_ptr", "q_ptr", "k_ptr", "v_ptr", "lse_ptr", *bias]
    if name == "_attention_bwd_dq_kernel":
        writes = ["dq_ptr", "delta_ptr"] + (["dbias_ptr"] if a["BIAS_GRAD"] else [])
        work = Work(_tensor_bytes(a, saved + ["out_ptr"]), _tensor_bytes(a, writes), pairs * (2 * d + dv), unit)
        return work, programs * _cdiv(nk, a["BLOCK_N"])
    if name == "_attention_bwd_dkdv_kernel":
        work = Work(
            _tensor_bytes(a, saved + ["delta_ptr"]), _tensor_bytes(a, ["dk_ptr", "dv_ptr"]), pairs * 2 * (d + dv), unit
        )
        return work, programs * _cdiv(nq, a["BLOCK_M"])
    if name == "_attention_bwd_short_kernel":
        # one pass: S and dP, then dq (and without SPLIT_Q dv and dk) from P and dS; the dS partials written once
        # per chunk; with SPLIT_Q delta for the dk/dv kernel
        ds = ["ds_ptr"] if a["DS_MODE"] else []
        if a["SPLIT_Q"]:
            writes, flops = ["dq_ptr", "delta_ptr", *ds], pairs * (2 * d + dv)
        else:
            writes, flops = ["dq_ptr", "dk_ptr", "dv_ptr", *ds], pairs * (3 * d + 2 * dv)
        work = Work(_tensor_bytes(a, saved + ["out_ptr"]), _tensor_bytes(a, writes), flops, unit)
        heads, chunks, q_blocks = call.grid
        entries = heads * q_blocks * _chunk_entries(batch, chunks, a["batch_per_chunk"])
        return work, (entries * _cdiv(nk, a["BLOCK_N"]), entries)
    if name == "_attention_bwd_table_kernel":
        # S and dP recomputed: the least a table gradient that does not store dS must do.
        work = Work(_tensor_bytes(a, saved + ["delta_ptr"]), _tensor_bytes(a, ["partial_ptr"]), pairs * (d + dv), unit)
        return work, _table_iterations(a, call.grid)
    raise ValueError(f"kernel: no work model for {name}")


# --- the training-step launches of each op --------------------------------------------------------------------------


def _meta(*shape: int, dtype: torch.dtype, memory_format: torch.memory_format = torch.contiguous_format):
    return torch.empty(shape, dtype=dtype, device="meta").contiguous(memory_format=memory_format)


def conv_calls(shape: ConvShape, dtype: torch.dtype, layout: torch.memory_format) -> list[TritonCall]:
    """The Triton launches of one training step (forward, then backward with every gradient) of a layer."""
    from vitkern.kernels import depthwise_conv as module

    n, c, s, k = shape.batch, shape.channels, shape.size, shape.kernel
    x = _meta(n, c, s, s, dtype=dtype, memory_format=layout)
    weight = _meta(c, 1, k, k, dtype=dtype)
    vector = _meta(c, dtype=dtype)
    epilogue = shape.convmixer_epilogue
    scale, shift, residual = (vector, vector, torch.empty_like(x)) if epilogue else (None, None, None)
    activation = GELU if epilogue else 0
    pad = (k - 1) // 2
    padding, stride, dilation = [pad, k - 1 - pad, pad, k - 1 - pad], [1, 1], [1, 1]
    with intercept_launches(module) as calls:
        y, z = module.depthwise_conv2d_fwd(
            x, weight, vector, scale, shift, residual, stride, padding, dilation, activation, epilogue
        )
        forward_launches = len(calls)
        module.depthwise_conv2d_bwd(
            torch.empty_like(y),
            x,
            weight,
            z,
            scale,
            stride,
            padding,
            dilation,
            activation,
            [True, True, True, epilogue, epilogue],
        )
    for call in calls[forward_launches:]:
        if call.fn.__name__ == "_dwconv_fwd_rows_kernel":
            call.label = "dwconv_bwd_input_rows"  # dx: the forward's row kernel on gz with the weights flipped
        if call.fn.__name__ == "_dwconv_fwd_cl_kernel":
            call.label = "dwconv_bwd_input_cl"  # dx at stride 1: the channels_last forward kernel on gz, flipped
    return calls


def attention_calls(case: AttentionCase, dtype: torch.dtype) -> list[TritonCall]:
    """The Triton launches of one training step (forward, backward with the bias gradient) of an attention case."""
    from vitkern.kernels import attention as module

    q = _meta(case.batch, case.heads, case.queries, case.head_dim, dtype=dtype)
    k = _meta(case.batch, case.heads, case.keys, case.head_dim, dtype=dtype)
    v = _meta(case.batch, case.heads, case.keys, case.value_dim, dtype=dtype)
    if case.kind == "rel_pos":
        bias, mode, geometry = (
            _meta((2 * case.side - 1) ** 2, case.heads, dtype=dtype),
            module.BIAS_REL_POS,
            [case.side, case.side],
        )
    else:
        bias, mode, geometry = _meta(case.heads, case.keys, dtype=dtype), module.BIAS_LEVIT, [case.side, case.stride]
    scale = case.head_dim**-0.5
    with intercept_launches(module) as calls:
        out, lse = module.attention_fwd(q, k, v, bias, None, mode, geometry, scale)
        module.attention_bwd(torch.empty_like(out), q, k, v, out, lse, bias, None, mode, geometry, scale, True)
    return calls


# --- CUDA C++: the launch plan and the extension's SASS -------------------------------------------------------------


PLAN_OP = "depthwise_conv2d_plan"
CUDA_NAMESPACE = "vitkern_cuda"
CUDA_DIRECTIONS = ("fwd", "dx", "dweight")
_CUDA_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class PlannedLaunch:
    """One entry of the plan op: ``"<kernel name>|gx,gy,gz|bx,by,bz|dynamic_smem_bytes"``."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    dynamic_shared: int

    @classmethod
    def parse(cls, text: str) -> PlannedLaunch:
        parts = text.split("|")
        if len(parts) != 4:
            raise ValueError(f"plan entry: expected 'name|gx,gy,gz|bx,by,bz|smem', got {text!r}")
        grid, block = (tuple(int(v) for v in part.split(",")) for part in parts[1:3])
        if len(grid) != 3 or len(block) != 3:
            raise ValueError(f"plan entry: expected three grid and three block sizes, got {text!r}")
        return cls(parts[0], grid, block, int(parts[3]))


def plan_op() -> Callable[..., list[str]]:
    """``torch.ops.vitkern_cuda.depthwise_conv2d_plan`` of the built extension; raises where there is none."""
    if extension_path() is None:
        raise RuntimeError("vitkern._C is not built, so the CUDA C++ kernels cannot be read")
    import vitkern._C  # noqa: F401 -- registers the ops

    namespace = getattr(torch.ops, CUDA_NAMESPACE)
    if not hasattr(namespace, PLAN_OP):
        raise RuntimeError(f"vitkern._C has no op {CUDA_NAMESPACE}::{PLAN_OP}; rebuild the extension")
    return getattr(namespace, PLAN_OP)


@functools.cache
def _extension_resources() -> dict[str, tuple[str, dict[str, int]]]:
    """By demangled name, each sm_90 function of ``vitkern/_C*.so``: its mangled name and resource usage."""
    path = extension_path()
    if path is None:
        raise RuntimeError("vitkern._C is not built, so the CUDA C++ kernels cannot be read")
    usage = [(name, fields) for arch, name, fields in resource_usage(path) if arch == ARCH]
    return dict(zip(demangle([name for name, _ in usage]), usage))


@functools.cache
def extension_kernel(name: str) -> tuple[_sass.Function, Code]:
    """The SASS and Code of one sm_90 function of ``vitkern/_C*.so``, by demangled name (only that function is
    disassembled)."""
    resources = _extension_resources()
    if name not in resources:
        raise ValueError(f"plan: kernel {name!r} is not an sm_90 function of vitkern._C")
    mangled, fields = resources[name]
    (function,) = _sass.dump_sass(extension_path(), ARCH, functions=(mangled,))
    return function, code_of_function(function, fields["REG"], static_shared(ARCH, fields["SHARED"]))


def extension_names() -> list[str]:
    """The demangled names of the sm_90 functions of ``vitkern/_C*.so``."""
    return list(_extension_resources())


@functools.cache
def extension_code() -> dict[str, Code]:
    """Code of every sm_90 function of ``vitkern/_C*.so``, by demangled name (all disassembled at once)."""
    resources = _extension_resources()
    by_mangled = {mangled: (name, fields) for name, (mangled, fields) in resources.items()}
    code = {}
    for function in _sass.dump_sass(extension_path(), ARCH):
        name, fields = by_mangled[function.name]
        code[name] = code_of_function(function, fields["REG"], static_shared(ARCH, fields["SHARED"]))
    return code


# The arguments of the CUDA C++ launches, as the launchers of csrc/depthwise_conv_kernels.cuh compute them: a small
# host program compiled against that header (with the emulation's CUDA stand-ins, csrc/emulation/cuda_emulation.h),
# which runs the launchers' own planning and packs each launch's parameters. It mirrors csrc/depthwise_conv.cu's
# choice of null pointers; the plan op's entries must match its launches name for name, grid for grid.
ARGUMENTS_CPP = r"""
// The arguments of every CUDA C++ depthwise launch of one training step of a layer, from the launchers' own
// planning (csrc/depthwise_conv_kernels.cuh): one line a launch, "<direction>|<kernel>|gx,gy,gz|bx,by,bz|<dynamic
// shared bytes>|<parameter bytes in hex>", the parameters laid out as the CUDA ABI lays out kernel parameters (each
// at the next multiple of its alignment). Pointers are distinct made-up addresses, null where the op passes null.
// argv: dtype (float32 | float16 | bfloat16) N C H W K channels_last (0 | 1) epilogue (0 | 1).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace c10 {
struct Half {
  std::uint16_t bits = 0;
  Half() = default;
  Half(float) {}
  operator float() const { return 0.f; }
};
struct BFloat16 {
  std::uint16_t bits = 0;
  BFloat16() = default;
  BFloat16(float) {}
  operator float() const { return 0.f; }
};
}  // namespace c10

#include "depthwise_conv_kernels.cuh"

namespace vitkern::dwconv {
template <>
struct Spelling<c10::Half> {
  static std::string get() { return "c10::Half"; }
};
template <>
struct Spelling<c10::BFloat16> {
  static std::string get() { return "c10::BFloat16"; }
};
}  // namespace vitkern::dwconv

namespace dw = vitkern::dwconv;

template <typename T>
void put(std::vector<unsigned char>& out, const T& value) {
  const std::size_t at = (out.size() + alignof(T) - 1) / alignof(T) * alignof(T);
  out.resize(at + sizeof(T));
  std::memcpy(out.data() + at, &value, sizeof(T));
}

template <typename... Params, typename... Args>
std::string pack(void (*)(Params...), Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "one argument a kernel parameter");
  std::vector<unsigned char> bytes;
  (put<Params>(bytes, static_cast<Params>(args)), ...);
  std::string hex;
  char digits[3];
  for (unsigned char b : bytes) {
    std::snprintf(digits, sizeof digits, "%02x", b);
    hex += digits;
  }
  return hex;
}

void emit(const char* direction, const std::string& launch, const std::string& params) {
  std::printf("%s|%s|%s\n", direction, launch.c_str(), params.c_str());
}

template <typename S>
void run(const dw::Geometry& g, const dw::Strides& s, bool epilogue) {
  using A = float;
  auto ptr = [](int i) { return reinterpret_cast<S*>(std::uintptr_t{0x7f0000000000} + (std::uintptr_t(i) << 28)); };
  auto acc = [](int i) { return reinterpret_cast<A*>(std::uintptr_t{0x7e0000000000} + (std::uintptr_t(i) << 28)); };
  S* none = nullptr;
  const int act = epilogue ? dw::kGelu : dw::kNone;
  const dw::ConvLaunch f = dw::plan_fwd<S, A>(g, s, true);
  dw::with_conv_kernel<S, A, false>(f, [&](auto kernel, auto name, const auto& tiling) {
    emit("fwd", dw::describe_launch(name(), f.grid, f.block, f.shared_bytes),
         pack(kernel, ptr(1), ptr(2), ptr(3), epilogue ? ptr(4) : none, epilogue ? ptr(5) : none,
              epilogue ? ptr(6) : none, ptr(7), epilogue ? ptr(8) : none, g, s, s, tiling, act));
  });
  const dw::GradSource<S, A> grad{ptr(9), epilogue ? ptr(8) : none, epilogue ? ptr(4) : none, act};
  const dw::ConvLaunch d = dw::plan_dx<S, A>(g, s, s, true);
  dw::dx_launches<S, A>(d, g, grad, ptr(11), ptr(2), ptr(10), s, s,
                        [&](auto kernel, auto name, dim3 grid, dim3 block, std::size_t shared, auto&&... args) {
                          emit("dx", dw::describe_launch(name(), grid, block, shared), pack(kernel, args...));
                        });
  const dw::DweightPlan plan = dw::plan_dweight<S, A>(g, s, true);
  dw::dweight_launches<S, A>(plan, g, grad, ptr(1), acc(1), acc(2), acc(3), acc(4), s, s, true, true,
                             [&](auto kernel, auto name, dim3 grid, dim3 block, std::size_t shared, auto&&... args) {
                               emit("dweight", dw::describe_launch(name(), grid, block, shared), pack(kernel, args...));
                             });
}

int main(int argc, char** argv) {
  if (argc != 9) {
    std::fprintf(stderr, "usage: %s dtype N C H W K channels_last epilogue\n", argv[0]);
    return 2;
  }
  const std::string dtype = argv[1];
  const int64_t n = std::atoll(argv[2]), c = std::atoll(argv[3]), h = std::atoll(argv[4]), w = std::atoll(argv[5]);
  const int k = std::atoi(argv[6]);
  const bool channels_last = std::atoi(argv[7]) != 0, epilogue = std::atoi(argv[8]) != 0;
  const int pad = (k - 1) / 2;
  const dw::Geometry g{n, c, h, w, h, w, k, k, 1, 1, 1, 1, pad, pad};
  const dw::Strides s = channels_last ? dw::Strides{h * w * c, 1, w * c, c} : dw::Strides{c * h * w, h * w, w, 1};
  if (dtype == "float32") {
    run<float>(g, s, epilogue);
  } else if (dtype == "float16") {
    run<c10::Half>(g, s, epilogue);
  } else if (dtype == "bfloat16") {
    run<c10::BFloat16>(g, s, epilogue);
  } else {
    std::fprintf(stderr, "dtype: expected float32, float16 or bfloat16, got %s\n", argv[1]);
    return 2;
  }
  return 0;
}
"""
CSRC = Path(__file__).resolve().parents[2] / "csrc"
_ARGUMENT_HEADERS = ("depthwise_conv_kernels.cuh", "launch.h", "emulation/cuda_emulation.h")


def argument_program() -> Path:
    """:data:`ARGUMENTS_CPP` compiled by the host C++ compiler (``$CXX``, else g++ or c++) into :func:`cache_dir`,
    once per version of it and of the headers it includes."""
    digest = hashlib.sha256(ARGUMENTS_CPP.encode())
    for header in _ARGUMENT_HEADERS:
        path = CSRC / header
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the CUDA C++ sources are needed to compute the launches' arguments")
        digest.update(path.read_bytes())
    program = cache_dir() / "cuda_arguments" / digest.hexdigest()[:16] / "arguments"
    if program.is_file():
        return program
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        raise FileNotFoundError("a host C++ compiler ($CXX, g++ or c++) is needed to compute the launches' arguments")
    program.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vitkern-perf-model-", dir=program.parent) as tmp:
        source, built = Path(tmp) / "arguments.cpp", Path(tmp) / "arguments"
        source.write_text(ARGUMENTS_CPP)
        command = [compiler, "-std=c++20", "-O0", "-DVITKERN_EMULATION", f"-I{CSRC}", str(source), "-o", str(built)]
        result = subprocess.run([*command, "-pthread"], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"compiling the argument program failed: {result.stderr.strip()[-2000:]}")
        os.replace(built, program)
    return program


def cuda_arguments(shape: ConvShape, dtype: torch.dtype, layout: str) -> dict[str, list[tuple[str, bytes]]]:
    """By direction, each launch (``"<kernel>|gx,gy,gz|bx,by,bz|smem"``, as the plan op writes it) and its
    parameter bytes, from :func:`argument_program`."""
    command = [str(argument_program()), _CUDA_DTYPES[dtype], str(shape.batch), str(shape.channels)]
    command += [str(shape.size), str(shape.size), str(shape.kernel), str(int(layout == "channels_last"))]
    command += [str(int(shape.convmixer_epilogue))]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"the argument program failed: {result.stderr.strip()}")
    out: dict[str, list[tuple[str, bytes]]] = {}
    for line in result.stdout.splitlines():
        direction, rest = line.split("|", 1)
        launch, params = rest.rsplit("|", 1)
        out.setdefault(direction, []).append((launch, bytes.fromhex(params)))
    return out


def executed(function: _sass.Function, shape: _sass.LaunchShape) -> Executed:
    """What the warps of a launch issue, from :func:`vitkern.tools._sass.launch_counts` (kept in :func:`cache_dir`
    by the function's code and the launch)."""
    key = hashlib.sha256(repr((function.instructions, shape, _sass.sample_blocks(shape.grid))).encode())
    key = key.hexdigest()[:24]
    path = cache_dir() / "cuda_executed" / f"{key}.json"
    if path.is_file():
        counts = json.loads(path.read_text())
    else:
        counts = _sass.launch_counts(function, shape)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(counts))
    by_class: dict[str, float] = dict.fromkeys(_sass.CLASSES, 0.0)
    macs, tensor, hot_iterations = 0.0, {}, 0.0
    hot = function.hot_loop()
    for count, block in zip(counts, function.blocks()):
        if hot is not None and function.instructions[block.last].address == hot.end:
            hot_iterations = count
        if not count:
            continue
        mix = _sass.Mix.of(function.instructions[block.first : block.last + 1])
        for kind, n in mix.counts.items():
            by_class[kind] += count * n
        macs += count * mix.macs
        for precision, n in mix.tensor_macs.items():
            tensor[precision] = tensor.get(precision, 0.0) + count * n
    return Executed(by_class, macs, tensor, hot_iterations)


def _cuda_work(direction: str, kernel: str, shape: ConvShape, dtype: torch.dtype, launch: PlannedLaunch) -> Work:
    """Work of one planned launch: its direction's (forward, dx, dweight), a partial-sum reduction's for the
    dweight direction's ``reduce`` kernels, or, in the dx direction, the element-wise dz kernel's (dy and z read, dz
    written) and the sliding-window dx kernel's, which reads dz (or dy itself) and the weight."""
    size = torch.empty((), dtype=dtype).element_size()
    maps = shape.batch * shape.channels * shape.size * shape.size
    taps = shape.kernel * shape.kernel
    vectors = (3 if shape.convmixer_epilogue else 1) * shape.channels * size
    weight = shape.channels * taps * size
    with_z = maps * size if shape.convmixer_epilogue else 0
    macs = maps * taps
    if direction == "fwd":
        reads = maps * size + weight + vectors + (maps * size if shape.convmixer_epilogue else 0)
        return Work(reads, maps * size + with_z, macs, "fp32")
    if direction == "dx" and "dz_kernel" in kernel:
        return Work(2 * maps * size + shape.channels * size, maps * size, 0, "fp32")
    if direction == "dx" and "window" in kernel:  # reads dz (or dy, where they are one)
        return Work(maps * size + weight, maps * size, macs, "fp32")
    if direction == "dx":
        return Work(maps * size + with_z + weight + vectors, maps * size, macs, "fp32")
    if direction == "dweight" and "reduce" in kernel:
        threads = math.prod(launch.grid) * math.prod(launch.block)
        return Work(threads * 4, threads * 4, 0, "fp32")
    if direction == "dweight":
        sums = 3 * shape.channels * 4
        return Work(2 * maps * size + with_z, shape.channels * taps * 4 + sums, macs, "fp32")
    raise ValueError(f"direction: expected one of {CUDA_DIRECTIONS}, got {direction!r}")


def cuda_launches(
    shape: ConvShape,
    dtype: torch.dtype,
    layout: str,
    plan: Callable[..., list[str]] | None = None,
    arguments: dict[str, list[tuple[str, bytes]]] | None = None,
) -> list[Launch]:
    """The CUDA C++ launches of one training step of a layer, from the plan (the extension's plan op unless given),
    each launch's arguments (:func:`cuda_arguments` unless given) and the extension's SASS, executed."""
    plan = plan_op() if plan is None else plan
    arguments = cuda_arguments(shape, dtype, layout) if arguments is None else arguments
    pad = (shape.kernel - 1) // 2
    padding = [pad, shape.kernel - 1 - pad] * 2
    activation = GELU if shape.convmixer_epilogue else 0
    launches = []
    for direction in CUDA_DIRECTIONS:
        entries = plan(
            [shape.batch, shape.channels, shape.size, shape.size],
            layout == "channels_last",
            _CUDA_DTYPES[dtype],
            [shape.kernel] * 2,
            [1, 1],
            padding,
            [1, 1],
            activation,
            direction,
        )
        unused = list(arguments.get(direction, []))
        for text in entries:
            entry = PlannedLaunch.parse(text)
            function, kernel_code = extension_kernel(entry.kernel)
            matching = [k for k, (launch, _) in enumerate(unused) if launch == text]
            if not matching:
                raise ValueError(f"plan: launch {text!r} is not one the argument program computes for {direction}")
            params = unused.pop(matching[0])[1]
            blocks = math.prod(entry.grid)
            warps = _cdiv(math.prod(entry.block), _sass.WARP_SIZE)
            run = executed(function, _sass.LaunchShape(entry.grid, entry.block, params))
            launches.append(
                Launch(
                    _short_cuda_name(entry.kernel),
                    kernel_code,
                    blocks,
                    warps,
                    entry.dynamic_shared,
                    run.hot_iterations / (blocks * warps),
                    True,
                    _cuda_work(direction, entry.kernel, shape, dtype, entry),
                    run,
                )
            )
    return launches


def _short_cuda_name(kernel: str) -> str:
    """``depthwise_conv2d_fwd_kernel<c10::Half, float>`` of a demangled ``void vitkern::dwconv::...(args)``."""
    name = kernel.split("(")[0].removeprefix("void ").replace("c10::", "")
    return name.rsplit("::", 1)[-1] if "<" not in name else name[name.rfind("::", 0, name.find("<")) + 2 :]


# --- rows -------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One table row: a launch at one shape, dtype, layout and backend, estimated on one device."""

    shape: str
    kernel: str
    backend: str
    dtype: str
    layout: str
    device: str
    floor_us: float | None = None
    estimate_us: float | None = None
    fma_share: float | None = None
    blocks_per_sm: int | None = None
    memory_us: float | None = None
    math_us: float | None = None
    issue_us: float | None = None
    tensor_us: float | None = None
    registers: int | None = None
    hot_loop: dict[str, int] | None = None
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        if self.floor_us is None or self.estimate_us is None or not self.floor_us:
            return None
        return self.estimate_us / self.floor_us


def launch_rows(launch: Launch, base: dict[str, str], devices: Sequence[str]) -> list[Row]:
    rows = []
    for device in devices:
        figures = estimate(launch, DEVICES[device])
        rows.append(
            Row(
                **base,
                kernel=launch.kernel,
                device=device,
                floor_us=figures["floor_us"],
                estimate_us=figures["estimate_us"],
                fma_share=(launch.code.hot if launch.code.hot.total else launch.code.rest).fma_share,
                blocks_per_sm=launch.blocks_per_sm(),
                memory_us=figures["memory_us"],
                math_us=figures["math_us"],
                issue_us=figures["issue_us"],
                tensor_us=figures["tensor_us"],
                registers=launch.code.registers,
                hot_loop=dict(launch.code.hot.counts),
            )
        )
    return rows


@dataclass(frozen=True)
class Case:
    """One (shape, dtype, layout) of the model: an op family ("conv" or "attention") and its shape."""

    family: str
    shape: ConvShape | AttentionCase
    dtype: str
    layout: str


def cases(subset: dict[str, tuple[str, ...]] | None = None, name_filter: str | None = None) -> list[Case]:
    """Every case of the full model, or of a subset (:data:`QUICK`, :data:`HEADLINE`), in table order."""
    dtypes = subset["dtypes"] if subset else tuple(DTYPES)
    layouts = subset["layouts"] if subset else tuple(LAYOUTS)
    selected = [Case("conv", s, d, lay) for s in CONV_SHAPES for d in dtypes for lay in layouts]
    selected += [Case("attention", c, d, "-") for c in ATTENTION_CASES for d in dtypes]
    if subset:
        selected = [case for case in selected if case.shape.name in subset["shapes"]]
    if name_filter:
        selected = [case for case in selected if name_filter in case.shape.name]
    return selected


def _triton_launches(case: Case) -> list[tuple[str, KernelSpec, Callable[[Code, int], Launch]]]:
    """(compile key, spec, make-launch) of each Triton launch of a case."""
    dtype = DTYPES[case.dtype]
    if case.family == "conv":
        calls, work_of = conv_calls(case.shape, dtype, LAYOUTS[case.layout]), _triton_dwconv
    else:
        calls, work_of = attention_calls(case.shape, dtype), _triton_attention
    out = []
    for call in calls:
        spec = launch_spec(call)
        work, iterations = work_of(call)
        iterations, outer = iterations if isinstance(iterations, tuple) else (iterations, None)

        def make(
            code: Code, dynamic_shared: int, call=call, work=work, iterations=iterations, outer=outer, spec=spec
        ) -> Launch:
            return Launch(
                call.kernel,
                code,
                math.prod(call.grid),
                spec.num_warps,
                dynamic_shared,
                iterations,
                False,
                work,
                outer_iterations=outer,
            )

        out.append((spec_key(spec), spec, make))
    return out


def _compile_task(task: tuple[str, str, dict[str, Any]]) -> tuple[Code, int] | str:
    """Compile (kernel module, kernel name, KernelSpec fields but fn): a task a spawned process can unpickle."""
    module, name, fields = task
    try:
        return compile_code(KernelSpec(fn=getattr(importlib.import_module(module), name), **fields))
    except Exception as exc:  # noqa: BLE001 -- a kernel that does not compile is reported in its rows
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _compile_all(specs: dict[str, KernelSpec], jobs: int) -> dict[str, tuple[Code, int] | str]:
    keys = list(specs)
    tasks = [
        (
            specs[key].fn.fn.__module__,
            specs[key].fn.__name__,
            {f.name: getattr(specs[key], f.name) for f in fields(KernelSpec) if f.name != "fn"},
        )
        for key in keys
    ]
    if jobs <= 1 or len(keys) <= 1:
        return {key: _compile_task(task) for key, task in zip(keys, tasks)}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(jobs, len(keys)), mp_context=context) as pool:
        return dict(zip(keys, pool.map(_compile_task, tasks)))


def model_rows(
    selected: Sequence[Case], devices: Sequence[str], jobs: int = 1, backends: Sequence[str] = ("triton", "cuda")
) -> list[Row]:
    """Rows of every launch of every case, on every device (Triton launches compiled once per distinct variant)."""
    planned: list[tuple[Case, str, list | str]] = []
    specs: dict[str, KernelSpec] = {}
    for case in selected:
        if "triton" in backends:
            try:
                launches = _triton_launches(case)
                specs.update({key: spec for key, spec, _ in launches})
                planned.append((case, "triton", launches))
            except Exception as exc:  # noqa: BLE001 -- reported in the case's row
                planned.append((case, "triton", f"{type(exc).__name__}: {exc}"))
        if "cuda" in backends and case.family == "conv":
            try:
                planned.append((case, "cuda", cuda_launches(case.shape, DTYPES[case.dtype], case.layout)))
            except Exception as exc:  # noqa: BLE001 -- reported in the case's row
                planned.append((case, "cuda", f"{type(exc).__name__}: {exc}"))
    compiled = _compile_all(specs, jobs)
    rows = []
    for case, backend, launches in planned:
        base = {"shape": case.shape.name, "backend": backend, "dtype": case.dtype, "layout": case.layout}
        if isinstance(launches, str):
            rows += [Row(**base, kernel="-", device=device, error=launches) for device in devices]
            continue
        for item in launches:
            if backend == "cuda":
                rows += launch_rows(item, base, devices)
                continue
            key, spec, make = item
            result = compiled[key]
            if isinstance(result, str):
                rows += [Row(**base, kernel=spec.name, device=device, error=result) for device in devices]
            else:
                rows += launch_rows(make(*result), base, devices)
    return rows


# --- output -------------------------------------------------------------------------------------------------------

COLUMNS = (
    "shape",
    "kernel",
    "backend",
    "dtype",
    "layout",
    "floor us",
    "estimate us",
    "est/floor",
    "hot FMA share",
    "blocks/SM",
)
JSON_KEYS = ("shape", "kernel", "backend", "dtype", "layout", "floor_us", "estimate_us", "fma_share", "blocks_per_sm")


def _cells(row: Row) -> tuple[str, ...]:
    if row.error is not None:
        return (row.shape, row.kernel, row.backend, row.dtype, row.layout, "-", "-", "-", "-", f"error: {row.error}")
    return (
        row.shape,
        row.kernel,
        row.backend,
        row.dtype,
        row.layout,
        f"{row.floor_us:.1f}",
        f"{row.estimate_us:.1f}",
        f"{row.ratio:.2f}" if row.ratio is not None else "-",
        f"{100 * row.fma_share:.0f}%",
        str(row.blocks_per_sm),
    )


def format_table(rows: Sequence[Row], markdown: bool = False) -> str:
    """The rows as an aligned text table, or a Markdown one."""
    table = [COLUMNS, *(_cells(row) for row in rows)]
    if markdown:
        lines = [f"| {' | '.join(line)} |" for line in table]
        return "\n".join([lines[0], "| " + " | ".join("---" for _ in COLUMNS) + " |", *lines[1:]])
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1] for line in table)


def row_json(row: Row) -> dict[str, Any]:
    """A row as JSON: the issue's keys first, then the device, the terms of the estimate and the hot-loop mix."""
    data = asdict(row)
    return {**{key: data[key] for key in JSON_KEYS}, **{k: v for k, v in data.items() if k not in JSON_KEYS}}


def _devices(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(","))
    if not names or any(name not in DEVICES for name in names):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(DEVICES)}, got {text!r}")
    return names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vitkern.tools.perf_model",
        description="Speed estimate of every vitkern GPU kernel at the benchmark shapes, from its sm_90 SASS.",
    )
    subset = parser.add_mutually_exclusive_group()
    subset.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK['shapes'])}, fp16, NCHW")
    subset.add_argument("--headline", action="store_true", help="only the README's shapes, fp16")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--filter", help="only shapes whose name contains this substring")
    parser.add_argument("--device", type=_devices, default=tuple(DEVICES), help="h100,h200 (default: both)")
    parser.add_argument("--backend", choices=("triton", "cuda"), action="append", help="repeatable; default both")
    add_jobs_argument(parser)
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table; exit status 0 when every row has an estimate, 1 when one failed, 2 on a usage error."""
    args = _parser().parse_args(argv)
    if refuse_interpreter("vitkern.tools.perf_model"):
        return 2
    selected = cases(QUICK if args.quick else HEADLINE if args.headline else None, args.filter)
    if not selected:
        print(f"perf_model: no shape matches --filter {args.filter!r}", file=sys.stderr)
        return 2
    rows = model_rows(selected, args.device, args.jobs, tuple(args.backend or ("triton", "cuda")))
    for device in args.device:
        spec = DEVICES[device]
        print(
            f"{spec.name}: {spec.sms} SMs, {spec.clock_hz / 1e9:.2f} GHz, {spec.dram_bytes_per_s / 1e12:.2f} TB/s "
            f"(an estimate on a model, not a measurement)"
        )
        print(format_table([row for row in rows if row.device == device], args.markdown))
        print()
    failed = [row for row in rows if row.error is not None]
    print(f"{len(rows)} rows, {len(failed)} without an estimate")
    if args.json is not None:
        args.json.write_text(json.dumps([row_json(row) for row in rows], indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
