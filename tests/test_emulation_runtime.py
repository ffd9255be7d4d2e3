"""The emulation runtime's strict semantics and the tensor-core helpers of csrc/mma.h, through standalone drivers
built with g++ (no torch):

* csrc/emulation/mma_layout_main.cpp: the fragments each lane holds after ldmatrix_a / ldmatrix_b /
  ldmatrix_b_trans and mma_m16n8k16, and the coordinates a_coord / b_coord / c_coord give, against the fragment
  figures of the PTX ISA transcribed below; and the faults of misaligned, non-shared or partial-warp use.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CXX = shutil.which("g++")
COMPILE = ["-std=c++20", "-pthread", "-O1", "-DVITKERN_EMULATION=1", f"-I{CSRC}"]
DRIVER_TIMEOUT_S = 120

# PTX ISA (docs.nvidia.com/cuda/parallel-thread-execution), "Matrix Fragments for mma.m16n8k16 with floating point
# type": the figures of the A (16 x 16), B (16 x 8, k x n) and C/D (16 x 8) fragment layouts for .f16/.bf16 inputs
# and .f32 accumulators, cell by cell, each cell "<lane>:<i>" for the lane holding that element as its a<i>, b<i>
# or c<i>. Rows of the figure are rows of the matrix.
A_FIGURE = """
0:0 0:1 1:0 1:1 2:0 2:1 3:0 3:1 0:4 0:5 1:4 1:5 2:4 2:5 3:4 3:5
4:0 4:1 5:0 5:1 6:0 6:1 7:0 7:1 4:4 4:5 5:4 5:5 6:4 6:5 7:4 7:5
8:0 8:1 9:0 9:1 10:0 10:1 11:0 11:1 8:4 8:5 9:4 9:5 10:4 10:5 11:4 11:5
12:0 12:1 13:0 13:1 14:0 14:1 15:0 15:1 12:4 12:5 13:4 13:5 14:4 14:5 15:4 15:5
16:0 16:1 17:0 17:1 18:0 18:1 19:0 19:1 16:4 16:5 17:4 17:5 18:4 18:5 19:4 19:5
20:0 20:1 21:0 21:1 22:0 22:1 23:0 23:1 20:4 20:5 21:4 21:5 22:4 22:5 23:4 23:5
24:0 24:1 25:0 25:1 26:0 26:1 27:0 27:1 24:4 24:5 25:4 25:5 26:4 26:5 27:4 27:5
28:0 28:1 29:0 29:1 30:0 30:1 31:0 31:1 28:4 28:5 29:4 29:5 30:4 30:5 31:4 31:5
0:2 0:3 1:2 1:3 2:2 2:3 3:2 3:3 0:6 0:7 1:6 1:7 2:6 2:7 3:6 3:7
4:2 4:3 5:2 5:3 6:2 6:3 7:2 7:3 4:6 4:7 5:6 5:7 6:6 6:7 7:6 7:7
8:2 8:3 9:2 9:3 10:2 10:3 11:2 11:3 8:6 8:7 9:6 9:7 10:6 10:7 11:6 11:7
12:2 12:3 13:2 13:3 14:2 14:3 15:2 15:3 12:6 12:7 13:6 13:7 14:6 14:7 15:6 15:7
16:2 16:3 17:2 17:3 18:2 18:3 19:2 19:3 16:6 16:7 17:6 17:7 18:6 18:7 19:6 19:7
20:2 20:3 21:2 21:3 22:2 22:3 23:2 23:3 20:6 20:7 21:6 21:7 22:6 22:7 23:6 23:7
24:2 24:3 25:2 25:3 26:2 26:3 27:2 27:3 24:6 24:7 25:6 25:7 26:6 26:7 27:6 27:7
28:2 28:3 29:2 29:3 30:2 30:3 31:2 31:3 28:6 28:7 29:6 29:7 30:6 30:7 31:6 31:7
"""
B_FIGURE = """
0:0 4:0 8:0 12:0 16:0 20:0 24:0 28:0
0:1 4:1 8:1 12:1 16:1 20:1 24:1 28:1
1:0 5:0 9:0 13:0 17:0 21:0 25:0 29:0
1:1 5:1 9:1 13:1 17:1 21:1 25:1 29:1
2:0 6:0 10:0 14:0 18:0 22:0 26:0 30:0
2:1 6:1 10:1 14:1 18:1 22:1 26:1 30:1
3:0 7:0 11:0 15:0 19:0 23:0 27:0 31:0
3:1 7:1 11:1 15:1 19:1 23:1 27:1 31:1
0:2 4:2 8:2 12:2 16:2 20:2 24:2 28:2
0:3 4:3 8:3 12:3 16:3 20:3 24:3 28:3
1:2 5:2 9:2 13:2 17:2 21:2 25:2 29:2
1:3 5:3 9:3 13:3 17:3 21:3 25:3 29:3
2:2 6:2 10:2 14:2 18:2 22:2 26:2 30:2
2:3 6:3 10:3 14:3 18:3 22:3 26:3 30:3
3:2 7:2 11:2 15:2 19:2 23:2 27:2 31:2
3:3 7:3 11:3 15:3 19:3 23:3 27:3 31:3
"""
C_FIGURE = """
0:0 0:1 1:0 1:1 2:0 2:1 3:0 3:1
4:0 4:1 5:0 5:1 6:0 6:1 7:0 7:1
8:0 8:1 9:0 9:1 10:0 10:1 11:0 11:1
12:0 12:1 13:0 13:1 14:0 14:1 15:0 15:1
16:0 16:1 17:0 17:1 18:0 18:1 19:0 19:1
20:0 20:1 21:0 21:1 22:0 22:1 23:0 23:1
24:0 24:1 25:0 25:1 26:0 26:1 27:0 27:1
28:0 28:1 29:0 29:1 30:0 30:1 31:0 31:1
0:2 0:3 1:2 1:3 2:2 2:3 3:2 3:3
4:2 4:3 5:2 5:3 6:2 6:3 7:2 7:3
8:2 8:3 9:2 9:3 10:2 10:3 11:2 11:3
12:2 12:3 13:2 13:3 14:2 14:3 15:2 15:3
16:2 16:3 17:2 17:3 18:2 18:3 19:2 19:3
20:2 20:3 21:2 21:3 22:2 22:3 23:2 23:3
24:2 24:3 25:2 25:3 26:2 26:3 27:2 27:3
28:2 28:3 29:2 29:3 30:2 30:3 31:2 31:3
"""


def _figure(text: str) -> dict[tuple[int, int], tuple[int, int]]:
    """(lane, i) -> (row, col) of a transcribed figure; each (lane, i) must appear exactly once."""
    where = {}
    for row, line in enumerate(text.strip().splitlines()):
        for col, cell in enumerate(line.split()):
            lane, i = map(int, cell.split(":"))
            assert (lane, i) not in where, f"figure names lane {lane} element {i} twice"
            where[lane, i] = (row, col)
    return where


def _build(source: Path, out: Path) -> Path:
    assert CXX is not None, "g++ is needed to build the emulation test drivers"
    subprocess.run([CXX, *COMPILE, str(source), "-o", str(out)], check=True, capture_output=True, text=True)
    return out


def _run(binary: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S, env=env)


@pytest.fixture(scope="module")
def mma_layout(tmp_path_factory) -> Path:
    return _build(CSRC / "emulation" / "mma_layout_main.cpp", tmp_path_factory.mktemp("emu") / "mma_layout")


def test_figures_cover_every_fragment_element():
    assert sorted(_figure(A_FIGURE)) == [(lane, i) for lane in range(32) for i in range(8)]
    assert sorted(_figure(B_FIGURE)) == [(lane, i) for lane in range(32) for i in range(4)]
    assert sorted(_figure(C_FIGURE)) == [(lane, i) for lane in range(32) for i in range(4)]


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_fragment_layouts_match_ptx_figures(mma_layout, dtype):
    result = _run(mma_layout, "layout", dtype)
    assert result.returncode == 0, result.stdout + result.stderr
    got: dict[str, dict[tuple[int, int], tuple[float, ...]]] = {}
    for line in result.stdout.splitlines():
        what, lane, i, *values = line.split()
        got.setdefault(what, {})[int(lane), int(i)] = tuple(float(v) for v in values)
    a_where, b_where, c_where = _figure(A_FIGURE), _figure(B_FIGURE), _figure(C_FIGURE)
    # The driver's tiles: A[r][k] = 16 r + k, B[k][n] = 8 k + n, C[r][n] = r - 2 n.
    a = torch.arange(256, dtype=torch.float64).view(16, 16)
    b = torch.arange(128, dtype=torch.float64).view(16, 8)
    c = torch.arange(16, dtype=torch.float64).view(16, 1) - 2 * torch.arange(8, dtype=torch.float64).view(1, 8)
    d = a @ b + c
    for (lane, i), (row, col) in a_where.items():
        assert got["a_coord"][lane, i] == (row, col), f"a_coord(lane {lane}, {i})"
        assert got["ldmatrix_a"][lane, i] == (a[row, col].item(),), f"ldmatrix_a lane {lane} a{i}"
    for (lane, i), (row, col) in b_where.items():
        assert got["b_coord"][lane, i] == (row, col), f"b_coord(lane {lane}, {i})"
        assert got["ldmatrix_b"][lane, i] == (b[row, col].item(),), f"ldmatrix_b lane {lane} b{i}"
        assert got["ldmatrix_b_trans"][lane, i] == (b[row, col].item(),), f"ldmatrix_b_trans lane {lane} b{i}"
    for (lane, i), (row, col) in c_where.items():
        assert got["c_coord"][lane, i] == (row, col), f"c_coord(lane {lane}, {i})"
        assert got["mma"][lane, i] == (d[row, col].item(),), f"mma lane {lane} d{i}"


@pytest.mark.parametrize(
    "mode,needles",
    [
        ("misaligned", ["misaligned ldmatrix_a at address 0x", "(needs 16-byte alignment)", "misaligned_kernel()"]),
        ("global", ["ldmatrix_a of 16 bytes at address 0x", "outside shared memory", "global_kernel("]),
        ("partial_warp", ["mma_m16n8k16 in a warp of 16 threads", "partial_warp_kernel()"]),
    ],
)
def test_fragment_helpers_fault(mma_layout, mode, needles):
    result = _run(mma_layout, mode)
    assert result.returncode != 0 and "no fault" not in result.stdout, result.stdout + result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr
