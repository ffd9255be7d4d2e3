"""The kernel report: registers, spills and shared memory of every kernel compiled for sm_80 and sm_90, no GPU.

(a) The tool on kernels of this file: a clean one passes; a spilling one, a shared-memory-hungry one and one that
    does not compile are flagged. CUDA figures read from a small binary nvcc builds here, against nvcc's ptxas log.
(b) Every spec of every real Triton kernel module compiles for sm_80 and sm_90 with zero spills and shared memory
    within limits (slow).
(c) Every CUDA C++ kernel of the built extension ``vitkern._C`` has no local memory and static shared memory within
    limits; the test fails when the extension is not built (CI always builds it).

The report compiles through Triton's GPU compiler, which the interpreter set by conftest.py replaces, so it runs in a
subprocess whose environment has no TRITON_INTERPRET. That subprocess imports this file as a kernel module.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import triton
import triton.language as tl

import vitkern
from vitkern.kernels._specs import KernelSpec
from vitkern.tools import kernel_report
from vitkern.tools.kernel_report import KernelResources
from vitkern.testing import require_build

THIS_MODULE = Path(__file__).stem
ARCHS = (80, 90)
ADD_BLOCK = 1024
NOT_A_POWER_OF_TWO = 1000  # tl.arange needs a power of two: a spec that does not compile
# One warp holding 8192 fp32 values live across a reduction: 256 a thread, more than the 255 registers; the launch
# caps them lower still.
SPILL_BLOCK = 8192
SPILL_MAXNREG = 128
# A transposed 256 x 256 fp32 tile goes through shared memory: 256 KiB, over both architectures' limits.
TRANSPOSE_TILE = 256
FP32_BYTES = 4


@triton.jit
def _add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = x + y. Grid (cdiv(n, BLOCK),); x_ptr, y_ptr, out_ptr: (n,)."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    y = tl.load(y_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, x + y, mask=mask)


@triton.jit
def _normalize_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    """out = x / sum(x * x) over one block kept in registers. Grid (1,); x_ptr, out_ptr: (BLOCK,)."""
    offsets = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets)
    tl.store(out_ptr + offsets, x / tl.sum(x * x, axis=0))


@triton.jit
def _transpose_kernel(x_ptr, out_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out = x^T for one tile. Grid (1,); x_ptr: (BLOCK_M, BLOCK_N), out_ptr: (BLOCK_N, BLOCK_M)."""
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    x = tl.load(x_ptr + rows[:, None] * BLOCK_N + cols[None, :])
    tl.store(out_ptr + cols[:, None] * BLOCK_M + rows[None, :], tl.trans(x))


def report_specs() -> list[KernelSpec]:
    """This file as a kernel module: a clean kernel (bf16), a broken, a spilling and a shared-memory-hungry one."""
    add = {"x_ptr": "*bf16", "y_ptr": "*bf16", "out_ptr": "*bf16", "n": "i32"}
    pair = {"x_ptr": "*fp32", "out_ptr": "*fp32"}
    return [
        KernelSpec("add", _add_kernel, add, {"BLOCK": ADD_BLOCK}, num_warps=4),
        KernelSpec("add_broken", _add_kernel, add, {"BLOCK": NOT_A_POWER_OF_TWO}, num_warps=4),
        KernelSpec(
            "normalize",
            _normalize_kernel,
            pair,
            {"BLOCK": SPILL_BLOCK},
            num_warps=1,
            num_stages=1,
            maxnreg=SPILL_MAXNREG,
        ),
        KernelSpec(
            "transpose", _transpose_kernel, pair, {"BLOCK_M": TRANSPOSE_TILE, "BLOCK_N": TRANSPOSE_TILE}, num_warps=16
        ),
    ]


def run_report(*args: str) -> subprocess.CompletedProcess:
    """``python -m vitkern.tools.kernel_report ARGS`` without TRITON_INTERPRET, with this file importable."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "vitkern.tools.kernel_report", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, check=False)


def rows_by_name(report: dict) -> dict[tuple[str, int], dict]:
    return {(row["name"], row["arch"]): row for row in report["rows"]}


# --- (a) the tool's figures and checks on this file's kernels -------------------------------------------------------


@pytest.fixture(scope="module")
def own_report(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    path = tmp_path_factory.mktemp("report") / "report.json"
    result = run_report("--module", THIS_MODULE, "--no-cuda", "--jobs", "1", "--json", str(path))
    assert path.exists(), f"no JSON report written:\n{result.stdout}\n{result.stderr}"
    return result, json.loads(path.read_text())


def test_report_covers_every_spec_and_arch(own_report):
    result, report = own_report
    assert report["failures"] == []
    names = [spec.name for spec in report_specs()]
    assert sorted(rows_by_name(report)) == sorted((name, arch) for name in names for arch in ARCHS)
    assert report["archs"] == list(ARCHS)
    for name in names:
        assert name in result.stdout


def test_clean_kernel_passes(own_report):
    _, report = own_report
    for arch in ARCHS:
        row = rows_by_name(report)[("add", arch)]
        assert row["error"] is None
        assert row["problems"] == [], row
        assert 0 < row["registers"] <= 255
        assert (row["spill_stores"], row["spill_loads"], row["stack"], row["local"]) == (0, 0, 0, 0)
        assert row["shared"] == 0, "an elementwise kernel needs no shared memory"
        assert row["dtypes"] == ["bf16"]
        assert row["shared_limit"] == kernel_report.SHARED_MEMORY_LIMITS[arch]


def test_spilling_kernel_is_flagged(own_report):
    result, report = own_report
    assert result.returncode == 1
    for arch in ARCHS:
        row = rows_by_name(report)[("normalize", arch)]
        assert row["error"] is None
        assert row["spill_stores"] > 0 and row["spill_loads"] > 0 and row["stack"] > 0, row
        assert 0 < row["registers"] <= SPILL_MAXNREG and f"maxnreg={SPILL_MAXNREG}" in row["config"]
        assert any(problem.startswith("spills") for problem in row["problems"])
    assert not report["ok"]


def test_shared_memory_hungry_kernel_is_flagged(own_report):
    _, report = own_report
    for arch in ARCHS:
        row = rows_by_name(report)[("transpose", arch)]
        assert row["error"] is None
        assert (row["spill_stores"], row["spill_loads"]) == (0, 0)
        assert row["shared"] >= TRANSPOSE_TILE * TRANSPOSE_TILE * FP32_BYTES > row["shared_limit"]
        assert row["problems"] == [
            f"shared memory {row['shared']} B over the sm_{arch} limit of {row['shared_limit']} B"
        ]


def test_compile_error_fails_its_row_only(own_report):
    result, report = own_report
    for arch in ARCHS:
        row = rows_by_name(report)[("add_broken", arch)]
        assert row["error"] and row["problems"] == [f"error: {row['error']}"]
        assert row["registers"] is None
    assert "add_broken" in result.stdout and "error:" in result.stdout


def test_filter_selects_by_name_and_config():
    selected, failures = kernel_report.load_specs([THIS_MODULE], "transpose")
    assert failures == []
    assert [spec.name for _, _, spec in selected] == ["transpose"]
    selected, _ = kernel_report.load_specs([THIS_MODULE], f"BLOCK={SPILL_BLOCK}")
    assert [spec.name for _, _, spec in selected] == ["normalize"]


@pytest.mark.parametrize(
    "module, reason", [("vitkern.kernels.no_such_module", "No module named"), ("vitkern.testing", "no report_specs")]
)
def test_unreadable_kernel_module_is_a_failure_not_a_pass(module, reason):
    rows, failures = kernel_report.triton_report([module], ARCHS)
    assert rows == []
    assert len(failures) == 1 and failures[0].startswith(module) and reason in failures[0]


def test_compile_inputs_order_arguments_and_align_pointers():
    add = report_specs()[0]
    _, signature, constexprs, attrs = kernel_report.compile_inputs(add)
    assert list(signature.items()) == [
        ("x_ptr", "*bf16"),
        ("y_ptr", "*bf16"),
        ("out_ptr", "*bf16"),
        ("n", "i32"),
        ("BLOCK", "constexpr"),
    ]
    assert constexprs == {"BLOCK": ADD_BLOCK}
    assert attrs == {(i,): [["tt.divisibility", 16]] for i in range(3)}


@pytest.mark.parametrize(
    "signature, constexprs, message",
    [
        ({"x_ptr": "*fp32"}, {"BLOCK": 8}, "'out_ptr' .* neither"),
        ({"x_ptr": "*fp32", "out_ptr": "*fp32", "y_ptr": "*fp32"}, {"BLOCK": 8}, "y_ptr"),
        ({"x_ptr": "*fp32", "out_ptr": "*fp32", "BLOCK": "i32"}, {"BLOCK": 8}, "both"),
    ],
)
def test_compile_inputs_reject_a_spec_that_does_not_match_the_kernel(signature, constexprs, message):
    with pytest.raises(ValueError, match=message):
        kernel_report.compile_inputs(KernelSpec("bad", _normalize_kernel, signature, constexprs))


def _row(arch: int, **figures) -> KernelResources:
    return KernelResources("cuda", "binary", "kernel", "", arch, **figures)


def test_problem_rules_use_each_architectures_limit():
    limit_80, limit_90 = (kernel_report.SHARED_MEMORY_LIMITS[arch] for arch in ARCHS)
    assert (limit_80, limit_90) == (163 * 1024, 227 * 1024)
    assert _row(80, shared=limit_80).ok
    assert _row(80, shared=limit_80 + 1).problems() == [
        f"shared memory {limit_80 + 1} B over the sm_80 limit of {limit_80} B"
    ]
    assert _row(90, shared=limit_80 + 1).ok
    assert _row(90, shared=limit_90).ok
    assert not _row(90, shared=limit_90 + 1).ok
    assert _row(90, stack=8).problems() == ["local memory: 8 B stack frame, 0 B local per thread"]
    assert _row(80, spill_stores=4, spill_loads=0, stack=8).problems() == ["spills: 4 B stored, 0 B loaded per thread"]
    assert _row(80, error="PTXASError: boom").problems() == ["error: PTXASError: boom"]


def test_reserved_shared_memory_is_taken_off_on_sm90_only():
    assert kernel_report.static_shared(80, 1040) == 1040
    assert kernel_report.static_shared(90, 1040) == 16
    assert kernel_report.static_shared(90, 0) == 0


def test_ptxas_log_parsing():
    log = (
        "ptxas info    : 0 bytes gmem\n"
        "ptxas info    : Compiling entry function 'normalize' for 'sm_80'\n"
        "ptxas info    : Function properties for normalize\n"
        "    96 bytes stack frame, 100 bytes spill stores, 92 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 0 barriers, 96 bytes cumulative stack size, 384 bytes cmem[0]\n"
    )
    assert kernel_report.parse_ptxas_log(log) == {"stack": 96, "spill_stores": 100, "spill_loads": 92}
    with pytest.raises(ValueError, match="log"):
        kernel_report.parse_ptxas_log("ptxas info    : 0 bytes gmem\n")


def test_refuses_to_run_under_the_interpreter(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernel_report.main(["--no-cuda"]) == 2
    assert "TRITON_INTERPRET" in capsys.readouterr().err


@pytest.mark.parametrize("option, value", [("--arch", "75"), ("--arch", "80,x"), ("--jobs", "0")])
def test_bad_options_name_the_option_and_value(option, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        kernel_report.main([option, value])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert option in error and repr(value) in error


CUDA_SOURCE = r"""
__global__ void scale(float* x, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= a;
}
__global__ void tile_shift(float* x) {
    __shared__ float tile[1024];
    tile[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    x[threadIdx.x] = tile[(threadIdx.x + 1) % 1024];
}
__global__ void local_array(float* x, int k) {
    float buffer[64];
    for (int j = 0; j < 64; ++j) buffer[(j * k) & 63] = x[threadIdx.x * 64 + j];
    x[threadIdx.x] = buffer[k & 63];
}
"""


def test_cuda_binary_figures_match_nvcc(tmp_path):
    nvcc = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    require_build(
        nvcc.is_file(), f"nvcc not found at {nvcc}: set CUDA_HOME to the CUDA toolkit (it also builds vitkern._C)"
    )
    source = tmp_path / "kernels.cu"
    source.write_text(CUDA_SOURCE)
    binary = tmp_path / "kernels.fatbin"
    gencode = [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in ARCHS]
    build = subprocess.run(
        [str(nvcc), "-fatbin", "-Xptxas", "-v", *gencode, str(source), "-o", str(binary)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    names = ("scale", "tile_shift", "local_array")
    # ptxas's own log, per kernel and arch: "Compiling entry function '_Z5scalePffi' for 'sm_80'", then
    # "N bytes stack frame" and "Used R registers, ..., S bytes smem" (no smem part when S is 0).
    ptxas = {}
    for block in build.stderr.split("Compiling entry function ")[1:]:
        function, arch = re.match(r"'(\w+)' for 'sm_(\d+)'", block).groups()
        name = next(name for name in names if name in function)
        smem = re.search(r"(\d+) bytes smem", block)
        ptxas[(name, int(arch))] = {
            "registers": int(re.search(r"Used (\d+) registers", block).group(1)),
            "stack": int(re.search(r"(\d+) bytes stack frame", block).group(1)),
            "shared": int(smem.group(1)) if smem else 0,
        }
    assert len(ptxas) == len(names) * len(ARCHS), build.stderr

    rows, failures = kernel_report.cuda_report(binary, ARCHS)
    assert failures == []
    assert len(rows) == len(names) * len(ARCHS)
    found = {(name, row.arch): row for row in rows for name in names if name in row.name}
    assert sorted(found) == sorted(ptxas)
    for key, row in found.items():
        assert {"registers": row.registers, "stack": row.stack, "shared": row.shared} == ptxas[key], build.stderr
        assert row.spill_stores is None and row.local == 0
    for arch in ARCHS:
        assert found[("scale", arch)].ok and found[("scale", arch)].shared == 0
        assert found[("tile_shift", arch)].ok and found[("tile_shift", arch)].shared == 1024 * FP32_BYTES
        assert found[("local_array", arch)].stack >= 64 * FP32_BYTES
        assert found[("local_array", arch)].problems()[0].startswith("local memory")

    rows_80, failures_80 = kernel_report.cuda_report(binary, (80,), name_filter="scale")
    assert failures_80 == [] and [(row.arch, "scale" in row.name) for row in rows_80] == [(80, True)]


# --- (b) the real Triton kernels ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("module", kernel_report.KERNEL_MODULES)
def test_real_kernels_compile_without_spills_within_shared_memory(module, tmp_path):
    path = tmp_path / "report.json"
    result = run_report("--module", module, "--no-cuda", "--jobs", str(os.cpu_count() or 1), "--json", str(path))
    assert path.exists(), f"no JSON report written:\n{result.stdout}\n{result.stderr}"
    report = json.loads(path.read_text())
    assert report["failures"] == [], report["failures"]
    rows = report["rows"]
    specs = len(kernel_report.load_specs([module])[0])
    assert len(rows) == specs * len(ARCHS) > 0
    assert {row["arch"] for row in rows} == set(ARCHS)
    dtypes = {dtype for row in rows for dtype in row["dtypes"]}
    assert {"fp32", "fp16", "bf16"} <= dtypes, f"{module}: report specs cover only {sorted(dtypes)}"
    failing = [f"{row['label']} sm_{row['arch']}: {'; '.join(row['problems'])}" for row in rows if row["problems"]]
    assert not failing, f"{len(failing)} of {len(rows)} rows fail:\n" + "\n".join(failing)
    assert result.returncode == 0, result.stderr


# The configurations the report found spilling on triton 3.6.0 before kernels/_compat.py's rule, by kernel, dtype and
# head dim (whatever tiles the launcher now picks for them): spill-free on the triton this runs on. A fast check, so
# that it runs on both stacks of CI; the slow test above covers every configuration on the pinned stack.
SPILLED_ON_TRITON_3_6 = (
    "REDUCE=1 CHANNELS_LAST=1",  # dwconv_bwd_epilogue, channels_last with the per-channel sums
    "attention_fwd_mode1_mask_fp16_d32_",
    "attention_fwd_mode1_mask_bf16_d32_",
    "attention_fwd_mode1_fp16_d128_",
    "attention_fwd_mode1_bf16_d128_",
    "attention_fwd_mode1_mask_fp16_d128_",
    "attention_fwd_mode1_mask_bf16_d128_",
    "attention_bwd_dq_mode1_mask_fp32_d32_",
    "attention_bwd_table_mode1_mask_fp16_d64",
    "attention_bwd_table_mode1_mask_bf16_d64",
    "attention_bwd_table_mode1_fp16_d128",
    "attention_bwd_table_mode1_bf16_d128",
    "attention_bwd_table_mode1_mask_fp16_d128",
    "attention_bwd_table_mode1_mask_bf16_d128",
    "attention_bwd_table_mode2_fp16_d128",
    "attention_bwd_table_mode2_bf16_d128",
)


def test_configurations_that_spilled_on_triton_3_6_are_spill_free_here(tmp_path):
    path = tmp_path / "report.json"
    name_filter = "|".join(SPILLED_ON_TRITON_3_6)
    result = run_report("--no-cuda", "--filter", name_filter, "--jobs", str(os.cpu_count() or 1), "--json", str(path))
    report = json.loads(path.read_text())
    assert report["failures"] == [], report["failures"]
    labels = [row["label"] for row in report["rows"]]
    for part in SPILLED_ON_TRITON_3_6:
        assert any(part in label for label in labels), f"no configuration matches {part!r}: the spec names changed"
    failing = [
        f"{row['label']} sm_{row['arch']}: {'; '.join(row['problems'])}" for row in report["rows"] if row["problems"]
    ]
    assert not failing, f"triton {triton.__version__}: " + "\n".join(failing)
    assert result.returncode == 0, result.stderr


def test_filter_alternatives():
    assert kernel_report.matches("attention_fwd_mode1_fp16_d32_t64[...]", "dwconv|mode1_fp16")
    assert not kernel_report.matches("attention_fwd_mode1_fp16_d32_t64[...]", "dwconv|mode2")
    assert kernel_report.matches("anything", None)


# --- (c) the CUDA C++ kernels of the built extension ---------------------------------------------------------------


def test_cuda_extension_kernels_have_no_local_memory():
    path = kernel_report.extension_path()
    require_build(
        path is not None,
        "vitkern._C is not built, so its kernels cannot be checked; build it with "
        "CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .",
    )
    # every architecture the extension was built for (setup.py records them; VITKERN_CUDA_ARCHS, default 8.0;9.0)
    info = json.loads((Path(vitkern.__file__).with_name("_build_info.json")).read_text())
    archs = tuple(int(arch.replace(".", "")) for arch in info.get("cuda_archs", ["8.0", "9.0"]))
    rows, failures = kernel_report.cuda_report(path, archs)
    assert failures == [], failures
    assert rows, f"no kernels found in {path}"
    assert {row.arch for row in rows} == set(archs)
    failing = [f"{row.name} sm_{row.arch}: {'; '.join(row.problems())}" for row in rows if not row.ok]
    assert not failing, "\n".join(failing)


def test_summary_has_one_line_per_kernel_family():
    """The summary folds every config and arch of a kernel into one line: configs, most registers, lowest
    register-limited occupancy, spill bytes, most shared memory, and how many rows fail."""
    row = kernel_report.KernelResources
    rows = [
        row("triton", "m", "fwd", "a", 80, registers=64, spill_stores=0, spill_loads=0, shared=1000),
        row("triton", "m", "fwd", "a", 90, registers=128, spill_stores=0, spill_loads=0, shared=3000),
        row("triton", "m", "fwd", "b", 80, registers=32, spill_stores=0, spill_loads=0, shared=2000),
        row("cuda", "_C.so", "dw_kernel", "", 90, registers=255, spill_stores=8, spill_loads=4, shared=500),
    ]
    lines = kernel_report.format_summary(rows).splitlines()
    assert len(lines) == 3  # the header and two families
    fwd = lines[1].split()
    assert fwd[:7] == ["triton", "fwd", "2", "128", "25%", "0", "3000"]  # 65536 / (128 * 32) = 16 of 64 warps
    assert fwd[7] == "ok"
    cuda = lines[2].split()
    assert cuda[:7] == ["cuda", "dw_kernel", "1", "255", "12%", "12", "500"]  # 65536 // (255 * 32) = 8 warps
    assert " ".join(cuda[7:]) == "1 failing"


def test_progress_reports_to_stderr(capsys, monkeypatch):
    clock = iter([0.0, 1.0, 10.0, 11.0])
    monkeypatch.setattr(kernel_report.time, "monotonic", lambda: next(clock))
    progress = kernel_report.Progress()
    row = kernel_report.KernelResources("triton", "m", "fwd", "a", 80)
    progress(1, 3, row)  # 1 s after the start: quiet
    progress(2, 3, row)  # 10 s: printed
    progress(3, 3, row)  # the last: printed
    err = capsys.readouterr().err.splitlines()
    assert [line.split()[2] for line in err] == ["2/3", "3/3"]
