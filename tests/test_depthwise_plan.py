"""The launch plan of the CUDA C++ depthwise kernels: ``depthwise_conv2d_plan`` (csrc/depthwise_conv.cu).

The op reports, for an input shape, layout, dtype and convolution, each kernel launch the forward or a backward
pass makes: "<demangled kernel name>|gx,gy,gz|bx,by,bz|dynamic_smem_bytes". The perf model reads the SASS of the
named kernel, so every name must be a function of the sm_90 SASS of the built ``vitkern._C`` (checked by listing
its functions with cuobjdump and demangling them, as the kernel report does). The emulation build
(``vitkern_emu``) and the nvcc build (``vitkern_cuda``) compile the same planner and must agree.
"""

from __future__ import annotations

import pytest
import torch

from vitkern._backend import cuda_module, emulation_module
from vitkern.tools import kernel_report

DIRECTIONS = ("fwd", "dx", "dweight")
DTYPES = ("float32", "float16", "bfloat16")
SM90 = 90
THREADS = 256  # kThreads of csrc/depthwise_conv_kernels.cuh
DEFAULT_DYNAMIC_SHARED = 48 * 1024  # the generic kernels stay within the default
SM80_DYNAMIC_SHARED = 163 * 1024  # sm_80's per-block opt-in limit, under sm_90's

# (N, C, H, W), (kh, kw), stride, padding (top, bottom, left, right), dilation
SHAPES = [
    ((64, 1536, 32, 32), (9, 9), (1, 1), (4, 4, 4, 4), (1, 1)),  # ConvMixer-1536/20
    ((64, 192, 28, 28), (7, 7), (1, 1), (3, 3, 3, 3), (1, 1)),  # ConvNeXt-T stage 2
    ((2, 16, 64, 64), (31, 31), (1, 1), (15, 15, 15, 15), (1, 1)),  # RepLKNet, tap chunks
    ((3, 5, 17, 23), (5, 3), (2, 1), (2, 1, 0, 1), (1, 2)),
    ((1, 1, 9, 9), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),
]


def _shape_id(shape):
    x, k, s, p, d = shape
    return f"{'x'.join(map(str, x))}-k{k[0]}x{k[1]}-s{s[0]}{s[1]}-d{d[0]}{d[1]}"


def _plan(ops, shape, channels_last, dtype, direction, activation=0):
    x, k, s, p, d = shape
    return list(
        ops.depthwise_conv2d_plan(
            list(x), channels_last, dtype, list(k), list(s), list(p), list(d), activation, direction
        )
    )


def _parse(launch: str) -> tuple[str, tuple[int, ...], tuple[int, ...], int]:
    name, grid, block, shared = launch.split("|")
    return name, tuple(map(int, grid.split(","))), tuple(map(int, block.split(","))), int(shared)


@pytest.fixture(scope="module")
def emu():
    assert emulation_module() is not None, "vitkern._emulation is not built: build with VITKERN_BUILD_EMULATION=1"
    return torch.ops.vitkern_emu


@pytest.fixture(scope="module")
def cuda():
    if cuda_module() is None:
        pytest.skip("vitkern._C is not built (needs a CUDA toolkit and a CUDA build of torch)")
    return torch.ops.vitkern_cuda


@pytest.fixture(scope="module")
def sm90_functions() -> set[str]:
    path = kernel_report.extension_path()
    if path is None:
        pytest.skip("vitkern._C is not built, so there is no SASS to read the plan's kernels from")
    usage = kernel_report.resource_usage(path)
    names = kernel_report.demangle([name for arch, name, _ in usage if arch == SM90])
    assert names, f"no sm_90 functions in {path}"
    return set(names)


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_plan_names_are_sm90_functions(cuda, sm90_functions, shape, channels_last):
    for dtype in DTYPES:
        for direction in DIRECTIONS:
            for launch in _plan(cuda, shape, channels_last, dtype, direction):
                name = _parse(launch)[0]
                assert name in sm90_functions, f"{direction} {dtype}: {name!r} is not in the sm_90 SASS of vitkern._C"


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_emulation_and_cuda_builds_plan_alike(emu, cuda, shape):
    for channels_last in (False, True):
        for dtype in DTYPES:
            for direction in DIRECTIONS:
                assert _plan(emu, shape, channels_last, dtype, direction) == _plan(
                    cuda, shape, channels_last, dtype, direction
                )


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_plan_launches(emu, shape, channels_last):
    (n, c, _, _), (kh, kw) = shape[0], shape[1]
    for dtype in DTYPES:
        scalar = {"float32": "float", "float16": "c10::Half", "bfloat16": "c10::BFloat16"}[dtype]
        for direction in DIRECTIONS:
            launches = [_parse(launch) for launch in _plan(emu, shape, channels_last, dtype, direction)]
            kernels = [name.split("<")[0].removeprefix("void vitkern::dwconv::") for name, *_ in launches]
            if direction == "dweight":
                assert kernels[0].startswith("depthwise_conv2d_dweight_kernel") and kernels[1:] == [
                    "reduce_partials_kernel"
                ]
                # The reduction covers every (channel, tap) of the weight.
                _, grid, block, shared = launches[1]
                assert grid[0] * block[0] >= c * kh * kw and shared == 0
            else:
                assert len(kernels) == 1 and kernels[0].startswith(f"depthwise_conv2d_{direction}_")
                assert launches[0][1][2] == n, "one grid layer per image"
            main_name, grid, block, shared = launches[0]
            assert f"<{scalar}, float" in main_name
            # whole warps, at most THREADS; the generic kernels always take THREADS
            assert block[0] % 32 == 0 and 32 <= block[0] <= THREADS and block[1:] == (1, 1)
            if "window" not in main_name:
                assert block == (THREADS, 1, 1)
            assert min(grid) >= 1 and grid[1] * 32 >= c
            # the window kernels ask for more than the default (csrc/launch.h allow_shared), within sm_80's 163 KiB
            assert 0 < shared <= (SM80_DYNAMIC_SHARED if "window" in main_name else DEFAULT_DYNAMIC_SHARED)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_window_dx_computes_dz_first_behind_an_activation(emu, channels_last):
    """With an activation (and its scale) dz differs from dy: the sliding-window dx reads it from an element-wise
    kernel's output over the whole output, one thread a 16-byte vector; without one it reads dy itself."""
    shape = SHAPES[0]  # ConvMixer-1536/20
    (n, c, h, w) = shape[0]
    plain = [_parse(launch) for launch in _plan(emu, shape, channels_last, "float16", "dx")]
    fused = [_parse(launch) for launch in _plan(emu, shape, channels_last, "float16", "dx", activation=1)]
    assert [name for name, *_ in plain] == [name for name, *_ in fused[1:]]
    assert "dx_window_kernel" in plain[0][0]
    dz_name, grid, block, shared = fused[0]
    assert dz_name.startswith("void vitkern::dwconv::depthwise_conv2d_dz_kernel<c10::Half, float, 8>")
    assert grid == (n * c * h * w // (8 * THREADS), 1, 1) and block == (THREADS, 1, 1) and shared == 0


@pytest.mark.parametrize("size", [(85, 85), (73, 112), (25, 320)])
def test_window_tiling_of_heights_at_the_block_limit(emu, size):
    """NCHW sizes whose balanced tile height, rounded up to the two rows a thread takes, would ask for more than a
    block's threads for one plane: the plan still holds at least one plane a block."""
    h, w = size
    shape = ((1, 3, h, w), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    for direction in ("fwd", "dx"):
        ((name, grid, block, shared),) = [_parse(launch) for launch in _plan(emu, shape, False, "float16", direction)]
        assert "window_kernel" in name
        assert 32 <= block[0] <= THREADS and grid[1] >= 1 and shared > 0


def test_plan_empty_input_launches_nothing(emu):
    assert _plan(emu, ((0, 4, 8, 8), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)), False, "float16", "fwd") == []


@pytest.mark.parametrize(
    "change,exc,needle",
    [
        (dict(x_shape=[4, 8, 8]), ValueError, "x: expected"),
        (dict(kernel=[3]), ValueError, "kernel: expected"),
        (dict(kernel=[64, 3]), ValueError, "kernel: expected"),
        (dict(dtype="float64"), ValueError, 'dtype: expected .* got "float64"'),
        (dict(direction="bwd"), ValueError, 'direction: expected .* got "bwd"'),
        (dict(stride=[0, 1]), ValueError, "stride: expected"),
        (dict(padding=[1, 1]), ValueError, "padding: expected"),
        (dict(dilation=[1, 0]), ValueError, "dilation: expected"),
        (dict(activation=3), ValueError, "activation: expected"),
    ],
)
def test_plan_argument_checks(emu, change, exc, needle):
    args = dict(
        x_shape=[2, 4, 8, 8],
        channels_last=False,
        dtype="float16",
        kernel=[3, 3],
        stride=[1, 1],
        padding=[1, 1, 1, 1],
        dilation=[1, 1],
        activation=0,
        direction="fwd",
    )
    args.update(change)
    with pytest.raises(exc, match=needle):
        emu.depthwise_conv2d_plan(*args.values())
