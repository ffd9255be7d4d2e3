"""The perf model: SASS reading on kernels whose loops are known by hand, occupancy and floors computed by hand, the
launch capture of the Triton launchers, and the whole model on its reduced (``--quick``) shape set.

The model compiles through Triton's GPU compiler, which the interpreter set by conftest.py replaces, so the whole
run goes through a subprocess whose environment has no TRITON_INTERPRET (as in test_kernel_report.py). The pieces
that compile nothing run in this process.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitkern.tools import _sass, perf_model

NVCC = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"

# Two nested loops: the inner one (unrolled once) reads one shared word and does four FFMA with it; the outer one
# reads one global word per iteration and adds it (FADD, not an FMA).
KNOWN_LOOPS_CU = r"""
extern "C" __global__ void known_loops(const float* __restrict__ x, float* __restrict__ y, int outer, int inner) {
  __shared__ float tile[64];
  tile[threadIdx.x % 64] = x[threadIdx.x];
  __syncthreads();
  const float w = x[blockDim.x + threadIdx.x];
  float a0 = 0.f, a1 = 1.f, a2 = 2.f, a3 = 3.f;
#pragma unroll 1
  for (int j = 0; j < outer; ++j) {
    a0 += x[j];
#pragma unroll 1
    for (int i = 0; i < inner; ++i) {
      const float s = tile[(i + j) & 63];
      a0 = fmaf(a0, w, s);
      a1 = fmaf(a1, w, s);
      a2 = fmaf(a2, w, s);
      a3 = fmaf(a3, w, s);
    }
  }
  y[threadIdx.x] = a0 + a1 + a2 + a3;
}
"""


def compile_one_kernel(tmp_path_factory, name: str, source: str) -> _sass.Function:
    """The SASS of the one kernel in ``source``, compiled with nvcc for sm_90 in a fresh directory ``name``."""
    if not NVCC.is_file():
        pytest.skip(f"needs nvcc (not at {NVCC}) to compile the hand-written kernel")
    tmp = tmp_path_factory.mktemp(name)
    (tmp / "k.cu").write_text(source)
    subprocess.run([str(NVCC), "-cubin", "-arch=sm_90", "-o", str(tmp / "k.cubin"), str(tmp / "k.cu")], check=True)
    (function,) = _sass.dump_sass(tmp / "k.cubin")
    return function


@pytest.fixture(scope="module")
def known_loops(tmp_path_factory) -> _sass.Function:
    function = compile_one_kernel(tmp_path_factory, "known_loops", KNOWN_LOOPS_CU)
    assert function.name == "known_loops"
    return function


def test_hot_loop_of_a_known_kernel(known_loops):
    hot = known_loops.hot_loop()
    assert hot is not None and hot.innermost
    counts = hot.mix.counts
    assert (counts["ffma"], counts["lds"], counts["hfma2"], counts["mma"]) == (4, 1, 0, 0)
    assert (counts["ldg"], counts["sts"], counts["stg"]) == (0, 0, 0)
    assert counts["other"] >= 1  # the branch back
    assert hot.mix.macs == 4 * 32
    assert hot.mix.fma_share == pytest.approx(4 / hot.mix.total)


def test_enclosing_loop_counts_only_its_own_instructions(known_loops):
    hot = known_loops.hot_loop()
    outer = [loop for loop in known_loops.loops() if loop.start <= hot.start and hot.end <= loop.end and loop != hot]
    assert len(outer) == 1 and not outer[0].innermost
    assert (outer[0].mix.counts["ldg"], outer[0].mix.counts["ffma"], outer[0].mix.counts["lds"]) == (1, 0, 0)


def test_whole_kernel_mix(known_loops):
    mix = known_loops.mix()
    # ptxas writes constant moves as HFMA2.MMA R, -RZ, RZ, a, b: they are moves, not fp16 math
    assert mix.counts["hfma2"] == 0
    assert mix.counts["sts"] == 1 and mix.counts["stg"] == 1
    assert mix.counts["ffma"] == 4
    assert known_loops.instructions[-1].opcode == "EXIT"  # the trap loop after EXIT is not code that runs


def _back_edge_count(function: _sass.Function, loop: _sass.Loop, counts: list[int]) -> int:
    """Warp executions of the block that ends with the loop's branch back."""
    (count,) = [
        count
        for count, block in zip(counts, function.blocks())
        if function.instructions[block.last].address == loop.end
    ]
    return count


@pytest.mark.parametrize(("outer", "inner", "threads"), [(5, 7, 64), (0, 7, 64), (3, 1, 33)])
def test_executed_loops_of_a_known_kernel(known_loops, outer, inner, threads):
    """Every warp runs the outer loop `outer` times and the inner one `inner` times per outer iteration; 33 threads
    are two warps, the second with one lane."""
    params = struct.pack("<QQii", 0x10000, 0x20000, outer, inner)
    counts = _sass.run_block(known_loops, _sass.LaunchShape((1, 1, 1), (threads, 1, 1), params), (0, 0, 0))
    warps = -(-threads // 32)
    hot = known_loops.hot_loop()
    (outer_loop,) = [o for o in known_loops.loops() if o != hot and o.start <= hot.start and hot.end <= o.end]
    assert _back_edge_count(known_loops, hot, counts) == warps * outer * inner
    assert _back_edge_count(known_loops, outer_loop, counts) == warps * outer
    assert counts[0] == warps  # the entry block, once a warp
    exits = [i for i, block in enumerate(known_loops.blocks()) if _sass.EXIT_BLOCK in block.successors]
    assert sum(counts[i] for i in exits) == warps


# A branch on the thread index around a loop whose trip count is a signed quotient of two arguments: the executor
# must split warps, divide as the GPU does (through the float reciprocal) and compare 64-bit pointers against null.
KNOWN_BRANCHES_CU = r"""
extern "C" __global__ void known_branches(const float* __restrict__ x, float* __restrict__ y,
                                          const float* __restrict__ bias, int n, int d, int split) {
  float acc = 0.f;
  if (static_cast<int>(threadIdx.x) < split) {
#pragma unroll 1
    for (int i = 0; i < n / d; ++i) {
      acc = fmaf(acc, x[threadIdx.x], x[i]);
    }
  }
  if (bias != nullptr) {
    acc = acc * bias[threadIdx.x] + bias[blockDim.x + threadIdx.x];
  }
  y[threadIdx.x] = acc;
}
"""


@pytest.fixture(scope="module")
def known_branches(tmp_path_factory) -> _sass.Function:
    return compile_one_kernel(tmp_path_factory, "known_branches", KNOWN_BRANCHES_CU)


@pytest.mark.parametrize(
    ("n", "d", "split", "warps_in_loop", "trips"),
    [
        (100, 7, 40, 2, 14),  # lanes 0-39: all of warp 0, 8 lanes of warp 1
        (100, 7, 32, 1, 14),  # warp 0 alone
        (256, 49, 96, 3, 5),
        (-100, 7, 96, 3, 0),  # -14: no iteration
        (100, -7, 96, 3, 0),
        (7, 100, 96, 3, 0),
    ],
)
def test_executed_branches_of_a_known_kernel(known_branches, n, d, split, warps_in_loop, trips):
    hot = known_branches.hot_loop()
    assert hot is not None and hot.mix.counts["ffma"] == 1
    for bias, extra in ((0, 0), (0x30000, 1)):
        params = struct.pack("<QQQiii", 0x10000, 0x20000, bias, n, d, split)
        counts = _sass.run_block(known_branches, _sass.LaunchShape((1, 1, 1), (96, 1, 1), params), (0, 0, 0))
        assert _back_edge_count(known_branches, hot, counts) == warps_in_loop * trips
        mix = [_sass.Mix.of(known_branches.instructions[b.first : b.last + 1]) for b in known_branches.blocks()]
        # the bias's FFMA runs once in each of the 3 warps where bias is not null
        ffma_outside = sum(c * m.counts["ffma"] for c, m in zip(counts, mix)) - warps_in_loop * trips
        assert ffma_outside == 3 * extra


def test_an_instruction_the_executor_does_not_know_fails_only_where_a_warp_runs_it():
    """A subroutine call (the executor does not follow calls) in code the launch never reaches, such as a 64-bit
    division's slow path behind a branch on the sizes, counts zero; where a warp reaches it, the run fails."""
    ins = _sass.Instruction
    shape = _sass.LaunchShape((1, 1, 1), (32, 1, 1), b"")
    unreached = _sass.Function("f", [ins(0x0, "EXIT", "", "", ""), ins(0x10, "CALL", ".REL.NOINC", "0x30", "")])
    counts = _sass.run_block(unreached, shape, (0, 0, 0))
    assert counts[0] == 1 and sum(counts[1:]) == 0
    reached = _sass.Function("g", [ins(0x0, "CALL", ".REL.NOINC", "0x20", ""), ins(0x10, "EXIT", "", "", "")])
    with pytest.raises(_sass.SimulationError, match="CALL"):
        _sass.run_block(reached, shape, (0, 0, 0))


def test_sample_blocks_weights_cover_the_grid():
    for grid in [(1, 1, 1), (3, 2, 1), (4, 96, 64), (163, 6, 1)]:
        samples = _sass.sample_blocks(grid)
        assert sum(weight for _, weight in samples) == grid[0] * grid[1] * grid[2]
        assert all(all(0 <= i < g for i, g in zip(index, grid)) for index, _ in samples)
        assert (0, 0, 0) in [index for index, _ in samples]
        assert tuple(g - 1 for g in grid) in [index for index, _ in samples]


def test_executed_instructions_replace_the_hot_loop_count():
    """A launch with what its warps issued: the issue time is theirs, spread over the warps launched."""
    nothing = _sass.Mix({kind: 0 for kind in _sass.CLASSES})
    code = perf_model.Code(nothing, nothing, 64, 0)
    counts = dict.fromkeys(_sass.CLASSES, 0.0) | {"ffma": 132 * 2 * 8 * 60.0, "int": 132 * 2 * 8 * 40.0}
    executed = perf_model.Executed(counts, 132 * 2 * 8 * 60.0 * 32, {})
    launch = perf_model.Launch("k", code, 132 * 2, 8, 0, 0.0, True, perf_model.Work(0, 0, 0, "fp32"), executed)
    assert launch.warp_instructions() == 132 * 2 * 8 * 100
    figures = perf_model.estimate(launch, perf_model.DEVICES["h100"])
    assert figures["issue_us"] == pytest.approx(2 * 8 * 100 / 4 / 1.98e9 * 1e6)


SASS_SNIPPET = """
	code for sm_90
		Function : tensor_loop
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0020*/                   HGMMA.64x128x16.F32 gdesc[UR4], RZ, !UPT ;
        /*0030*/                   HMMA.1684.F32.TF32 R4, R8, R12, R4 ;
        /*0040*/                   HFMA2 R2, R3, R4, R5 ;
        /*0050*/               @P0 BRA 0x10 ;
        /*0060*/                   EXIT ;
        /*0070*/                   BRA 0x70;
        /*0080*/                   NOP;
"""


def test_tensor_core_instructions_by_hand():
    (function,) = _sass.parse_sass(SASS_SNIPPET)
    assert [ins.opcode for ins in function.instructions][-1] == "EXIT"
    (loop,) = function.loops()
    assert (loop.start, loop.end) == (0x10, 0x50)
    assert loop.mix.counts["mma"] == 3 and loop.mix.counts["hfma2"] == 1
    # m16n8k16 per warp; 64x128x16 per warpgroup of 4 warps; m16n8k4; HFMA2 two per lane
    assert loop.mix.tensor_macs == {"bf16": 16 * 8 * 16, "fp16": 64 * 128 * 16 // 4, "tf32": 16 * 8 * 4}
    assert loop.mix.macs == 16 * 8 * 16 + 64 * 128 * 16 // 4 + 16 * 8 * 4 + 64


@pytest.mark.parametrize(
    ("registers", "shared", "threads", "expected"),
    [
        (48, 0, 256, 5),  # 48 x 32 = 1536 registers a warp: 42 warps, 5 blocks of 8
        (58, 0, 256, 4),  # rounded up to 64 a thread: 2048 a warp, 32 warps
        (106, 0, 256, 2),  # 112 a thread: 3584 a warp, 18 warps
        (32, 100_000, 128, 2),  # 233472 // (100000 + 1024)
        (16, 0, 1024, 2),  # 2048 threads
        (16, 0, 32, 32),  # the 32-block limit
        (255, 0, 256, 1),
    ],
)
def test_blocks_per_sm_by_hand(registers, shared, threads, expected):
    assert perf_model.blocks_per_sm(registers, shared, threads) == expected


def test_blocks_per_sm_rejects_bad_input():
    with pytest.raises(ValueError, match="threads_per_block"):
        perf_model.blocks_per_sm(32, 0, 4096)
    with pytest.raises(ValueError, match="registers"):
        perf_model.blocks_per_sm(300, 0, 128)


def _conv_launches(name: str, dtype=torch.float16, layout=torch.contiguous_format):
    shape = next(s for s in perf_model.CONV_SHAPES if s.name == name)
    return shape, perf_model.conv_calls(shape, dtype, layout)


def test_triton_launches_as_the_launcher_makes_them():
    _, calls = _conv_launches("convnext_t_stage2", dtype=torch.float32)
    names = [call.fn.__name__ for call in calls]
    # bias only: the epilogue backward reduces dbias, then dx and dweight
    assert names == [
        "_dwconv_fwd_kernel",
        "_dwconv_bwd_epilogue_kernel",
        "_dwconv_bwd_input_kernel",
        "_dwconv_bwd_weight_kernel",
    ]
    spec = perf_model.launch_spec(calls[0])
    # 28 x 28 = 784 output pixels take the NCHW tile (16 taps, 128 pixels, 1 channel) on 4 warps
    assert (spec.constexprs["BLOCK_T"], spec.constexprs["BLOCK_P"], spec.constexprs["BLOCK_C"]) == (16, 128, 1)
    assert spec.num_warps == 4
    assert calls[0].grid == (64 * 192 * 7,)
    assert perf_model._triton_dwconv(calls[0])[1] == 64 * 192 * 7 * 4  # 49 taps in 4 blocks of 16
    # unit strides and stride 1 become constants, 192 channels and the 16-divisible strides are marked divisible
    assert spec.constexprs["stride_xw"] == 1 and spec.constexprs["STRIDE_H"] == 1
    assert "C" in spec.aligned and "stride_xc" in spec.aligned and "H" not in spec.aligned
    assert spec.signature["x_ptr"] == "*fp32" and "stride_xw" not in spec.signature


def test_triton_row_kernel_launches():
    """fp16 NCHW at stride 1 with "same" padding: the forward and dx (gz is dy itself without an activation) run on
    the row kernel, in tiles of 16 rows and 32 columns of the 28 x 28 maps."""
    _, calls = _conv_launches("convnext_t_stage2")
    names = [call.fn.__name__ for call in calls]
    assert names == [
        "_dwconv_fwd_rows_kernel",
        "_dwconv_bwd_epilogue_kernel",
        "_dwconv_fwd_rows_kernel",
        "_dwconv_bwd_weight_kernel",
    ]
    for call in (calls[0], calls[2]):
        spec = perf_model.launch_spec(call)
        keys = ("KH", "KW", "PAD_T", "PAD_L", "BLOCK_R", "BLOCK_W", "ALIGN", "VEC")
        assert {k: spec.constexprs[k] for k in keys} == {
            "KH": 7,
            "KW": 7,
            "PAD_T": 3,
            "PAD_L": 3,
            "BLOCK_R": 16,
            "BLOCK_W": 32,
            "ALIGN": 4,  # 28 columns: rows in vectors of 4 elements, windows 4 columns past the tile
            "VEC": 4,
        }
        # 192 channels x 2 runs of rows x 1 column block; 16 images a program: 4 image groups
        assert call.grid == (192 * 2, 4) and call.args["images_per_program"] == 16
        work, iterations = perf_model._triton_dwconv(call)
        assert iterations == 192 * 2 * 64  # the image loop: once per image of each tile
        assert work.macs == 64 * 192 * 28 * 28 * 49
    assert (calls[0].kernel, calls[2].kernel) == ("dwconv_fwd_rows", "dwconv_bwd_input_rows")


def test_floors_by_hand():
    """ConvMixer-1536/20 forward, fp16 NCHW, on an H100 SXM."""
    _, calls = _conv_launches("convmixer_1536_20")
    work, iterations = perf_model._triton_dwconv(calls[0])
    maps = 64 * 1536 * 32 * 32
    # reads x, the residual, the weight and bias, scale and shift; writes y and the pre-activation z
    assert work.read_bytes == 2 * (2 * maps + 1536 * 81 + 3 * 1536)
    assert work.write_bytes == 2 * 2 * maps
    assert work.macs == maps * 81
    assert calls[0].fn.__name__ == "_dwconv_fwd_rows_kernel" and iterations == 1536 * 2 * 64
    launch = perf_model.Launch(
        "fwd", perf_model.Code(_sass.Mix.of([]), _sass.Mix.of([]), 32, 0), 1, 4, 0, 0.0, False, work
    )
    figures = perf_model.estimate(launch, perf_model.DEVICES["h100"])
    memory_us = (2 * (4 * maps + 1536 * 81 + 3 * 1536)) / 3.35e12 * 1e6  # 3.35 TB/s
    math_us = maps * 81 / (132 * 128 * 1.98e9) * 1e6  # 132 SMs x 128 fp32 lanes at 1.98 GHz
    assert figures["memory_us"] == pytest.approx(memory_us)
    assert figures["math_us"] == pytest.approx(math_us)
    assert figures["floor_us"] == pytest.approx(max(memory_us, math_us))
    h200 = perf_model.estimate(launch, perf_model.DEVICES["h200"])
    assert h200["memory_us"] == pytest.approx(memory_us * 3.35 / 4.8)


def test_issue_time_by_hand():
    """One wave of 132 x 2 blocks of 8 warps, 100 instructions a warp: 2 x 8 x 100 / (4 a clock) clocks an SM."""
    hot = _sass.Mix({kind: 0 for kind in _sass.CLASSES} | {"ffma": 10}, 320)
    rest = _sass.Mix({kind: 0 for kind in _sass.CLASSES} | {"int": 50})
    code = perf_model.Code(hot, rest, 64, 0)  # 64 registers: 4 blocks of 256 threads fit
    work = perf_model.Work(0, 0, 0, "fp32")
    launch = perf_model.Launch("k", code, 132 * 2, 8, 0, 132 * 2 * 5, False, work)
    figures = perf_model.estimate(launch, perf_model.DEVICES["h100"])
    assert figures["issue_us"] == pytest.approx(2 * 8 * 100 / 4 / 1.98e9 * 1e6)
    assert figures["estimate_us"] == figures["issue_us"]


def test_table_gradient_trip_count_by_hand():
    """Swin-T windows (7 x 7, under one 16-wide x block and one 64-wide bin block): every program's one x-block
    pair counts, so the query-row loop runs sum over dy of (7 - |dy|) = 49 times per head and image."""
    case = next(c for c in perf_model.ATTENTION_CASES if c.name == "swin_t_windows")
    calls = perf_model.attention_calls(case, torch.float32)  # fp16 takes the short-sequence backward
    (table,) = [call for call in calls if call.fn.__name__ == "_attention_bwd_table_kernel"]
    _, iterations = perf_model._triton_attention(table)
    assert iterations == 3 * 4096 * 49


def test_short_backward_trip_counts_by_hand():
    """Swin-T windows in fp16: one program per head and chunk of 12 windows (342 chunks of 4096 windows, 3 heads);
    the key-block loop runs cdiv(49, 16) = 4 times per window and head, the loop around it once per window."""
    case = next(c for c in perf_model.ATTENTION_CASES if c.name == "swin_t_windows")
    calls = perf_model.attention_calls(case, torch.float16)
    (short,) = [call for call in calls if call.fn.__name__ == "_attention_bwd_short_kernel"]
    assert short.grid == (3, 342, 1) and short.args["batch_per_chunk"] == 12
    _, (hot, outer) = perf_model._triton_attention(short)
    assert (hot, outer) == (3 * 4096 * 4, 3 * 4096)


def test_split_backward_trip_counts_by_hand():
    """CoAtNet-0 stage 3 in fp16 (196 tokens, 64 images, 12 heads): the short backward splits the queries into 4
    blocks of 64, per image the key-block loop runs cdiv(196, 16) = 13 times per query block and head, the loop
    around it once; the dk/dv kernel runs one program per 64-key block and image-head, 13 query blocks of 16 each."""
    case = next(c for c in perf_model.ATTENTION_CASES if c.name == "coatnet0_s3")
    calls = perf_model.attention_calls(case, torch.float16)
    (short,) = [call for call in calls if call.fn.__name__ == "_attention_bwd_short_kernel"]
    heads, chunks, blocks = short.grid
    assert (heads, blocks) == (12, 4) and short.args["SPLIT_Q"]
    assert chunks * short.args["batch_per_chunk"] >= 64 > (chunks - 1) * short.args["batch_per_chunk"]
    assert perf_model._triton_attention(short)[1] == (12 * 4 * 64 * 13, 12 * 4 * 64)
    (dkdv,) = [call for call in calls if call.fn.__name__ == "_attention_bwd_dkdv_kernel"]
    assert dkdv.grid == (4, 64 * 12)
    assert perf_model._triton_attention(dkdv)[1] == 4 * 64 * 12 * 13


def test_short_forward_trip_counts_by_hand():
    """Swin-T windows in fp16: one program per head and chunk of 12 windows (342 chunks of 4096 windows, 3 heads),
    one query block and one key block per window, so the hot loop is the loop over the chunk's windows: once per
    window and head. CoAtNet-0 stage 3 (196 tokens, 64 images, 12 heads): 4 query blocks, and per image the key-block
    loop runs cdiv(196, 32) = 7 times per query block, the loop around it once."""
    swin = next(c for c in perf_model.ATTENTION_CASES if c.name == "swin_t_windows")
    calls = perf_model.attention_calls(swin, torch.float16)
    (fwd,) = [c for c in calls if c.fn.__name__ == "_attention_fwd_short_kernel"]
    assert fwd.grid == (1, 3, 342) and fwd.args["batch_per_chunk"] == 12 and fwd.args["ONE_KEY_TILE"]
    assert perf_model._triton_attention(fwd)[1] == 3 * 4096
    coatnet = next(c for c in perf_model.ATTENTION_CASES if c.name == "coatnet0_s3")
    calls = perf_model.attention_calls(coatnet, torch.float16)
    (fwd,) = [c for c in calls if c.fn.__name__ == "_attention_fwd_short_kernel"]
    blocks, heads, chunks = fwd.grid
    assert (blocks, heads) == (4, 12) and not fwd.args["ONE_KEY_TILE"]
    assert chunks * fwd.args["batch_per_chunk"] >= 64 > (chunks - 1) * fwd.args["batch_per_chunk"]
    assert perf_model._triton_attention(fwd)[1] == (4 * 12 * 64 * 7, 4 * 12 * 64)


def run_model(*args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "vitkern.tools.perf_model", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def quick_rows(tmp_path_factory) -> tuple[subprocess.CompletedProcess, list[dict]]:
    path = tmp_path_factory.mktemp("perf_model") / "rows.json"
    result = run_model("--quick", "--jobs", "2", "--json", str(path))
    return result, json.loads(path.read_text()) if path.exists() else []


def test_quick_model_runs(quick_rows):
    result, rows = quick_rows
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "estimate" in result.stdout
    keys = ("shape", "kernel", "backend", "dtype", "layout", "floor_us", "estimate_us", "fma_share", "blocks_per_sm")
    assert rows and all(tuple(row)[: len(keys)] == keys for row in rows)
    triton_kernels = {row["kernel"] for row in rows if row["backend"] == "triton"}
    assert {
        "dwconv_fwd_rows",
        "dwconv_bwd_epilogue",
        "dwconv_bwd_weight",
        "attention_fwd_short",  # the quick set's attention shapes are short sequences in fp16 / bf16
        "attention_bwd_short",
        "attention_bins",
    } <= triton_kernels
    assert {row["device"] for row in rows} == set(perf_model.DEVICES)


def test_quick_model_estimates_are_at_least_the_floor(quick_rows):
    _, rows = quick_rows
    for row in rows:
        assert row["error"] is None, row
        assert row["estimate_us"] >= row["floor_us"] * (1 - 1e-9), row
        assert 0 <= row["fma_share"] <= 1 and row["blocks_per_sm"] >= 1, row


def test_quick_model_covers_the_cuda_kernels(quick_rows):
    if perf_model.extension_path() is None:
        pytest.skip("vitkern._C is not built (needs the nvcc build), so there is no SASS of the CUDA C++ kernels")
    _, rows = quick_rows
    cuda = {row["kernel"] for row in rows if row["backend"] == "cuda"}
    assert any("fwd" in name for name in cuda) and any("dx" in name for name in cuda)
    assert any("dweight" in name for name in cuda)


def test_refuses_to_run_under_the_interpreter(monkeypatch, capsys):
    monkeypatch.setattr(perf_model.knobs.runtime, "interpret", True)
    assert perf_model.main(["--quick"]) == 2
    assert "TRITON_INTERPRET" in capsys.readouterr().err


def test_rejects_unknown_device():
    with pytest.raises(SystemExit):
        perf_model.main(["--device", "a100"])


def test_unknown_filter_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setattr(perf_model.knobs.runtime, "interpret", False)
    assert perf_model.main(["--filter", "no_such_shape"]) == 2
    assert "no_such_shape" in capsys.readouterr().err


def test_cuda_launch_is_executed_on_its_arguments():
    """ConvNeXt-T stage 2 forward, fp16 NCHW, on the sliding-window kernel: runs of 14 columns fit the 28-wide rows
    and a thread takes two rows, so a channel plane takes 28 threads and a block 8 planes (224 threads: 7 warps, no
    lane idle; 24 channel blocks); every warp runs the hot loop over the window's K - 1 middle input rows (the first
    and last are peeled off), each lane 2 x 14 x 49 multiply-adds, none past the 28th column; the epilogue's code for
    activations, scale, shift, residual and z, never run with a bias alone, is not counted."""
    if perf_model.extension_path() is None:
        pytest.skip("vitkern._C is not built (needs the nvcc build), so there is no SASS of the CUDA C++ kernels")
    shape = next(s for s in perf_model.CONV_SHAPES if s.name == "convnext_t_stage2")
    launches = perf_model.cuda_launches(shape, torch.float16, "nchw")
    fwd = next(launch for launch in launches if "fwd_window_kernel<Half, float, 7, 14, false>" in launch.kernel)
    assert fwd.blocks == 1 * 24 * 64 and fwd.warps_per_block == 7
    assert fwd.hot_iterations == pytest.approx(7 - 1)
    warps = fwd.blocks * fwd.warps_per_block
    lanes_macs = warps * 32 * 2 * 14 * 7 * 7
    assert lanes_macs == fwd.work.macs
    # the convolution's multiply-adds, and a few of the epilogue's (the bias add and scale of 1 as one FFMA)
    assert lanes_macs <= fwd.executed.macs <= 1.05 * lanes_macs
    function, _ = perf_model.extension_kernel(
        next(n for n in perf_model.extension_names() if "fwd_window" in n and "c10::Half, float, 7, 14, false" in n)
    )
    # counting all of its code once a warp, the hot loop K - 1 times, would come to more than its length
    assert fwd.warp_instructions() / warps < len(function.instructions)
    assert {launch.kernel.split("<")[0] for launch in launches} == {
        "depthwise_conv2d_fwd_window_kernel",
        "depthwise_conv2d_dx_window_kernel",
        "depthwise_conv2d_dweight_kernel",
        "reduce_partials_kernel",
    }


def test_a_plan_the_argument_program_does_not_know_is_refused():
    if perf_model.extension_path() is None:
        pytest.skip("vitkern._C is not built (needs the nvcc build), so there is no SASS of the CUDA C++ kernels")
    shape = next(s for s in perf_model.CONV_SHAPES if s.name == "convnext_t_stage2")
    (name,) = [n for n in perf_model.extension_names() if "depthwise_conv2d_fwd_kernel<c10::Half, float>" in n]

    def plan(*args):
        return [f"{name}|8,192,64|256,1,1|4096"] if args[-1] == "fwd" else []

    with pytest.raises(ValueError, match="argument program"):
        perf_model.cuda_launches(shape, torch.float16, "nchw", plan)


@pytest.mark.parametrize(
    "guard, operands, expected",
    [
        ("", "0x40", ()),
        ("P0", "0x40", ("P0",)),
        ("", "!P1, 0x40", ("!P1",)),
        ("P0", "P1, 0x40", ("P0", "P1")),  # `@P0 BRA P1, target`: taken only where both hold
    ],
)
def test_branch_conditions_are_the_guard_and_the_predicate_operand(guard, operands, expected):
    ins = _sass.Instruction(0x10, "BRA", "", operands, guard)
    assert _sass._branch_condition(ins) == expected
