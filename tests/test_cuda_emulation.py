"""The CUDA C++ kernels through their emulation build (DESIGN.md, verification layer 3).

* The emulation runtime itself (csrc/emulation/cuda_emulation.h): barrier, static and dynamic shared memory, grid
  indexing, warp shuffles and atomics, through the standalone driver csrc/emulation/selftest_main.cpp built with g++.
* The kernels under ThreadSanitizer and AddressSanitizer: the same driver runs each family of kernels
  (KERNEL_MODES: forward and backward on a few shapes against naive loops) and must report nothing; a kernel
  missing a ``__syncthreads()`` (a race) and one writing past its shared memory must be reported.
* The ops of ``vitkern._emulation`` (``torch.ops.vitkern_emu``) behind ``vitkern.backend("cuda")`` on CPU tensors,
  against ``vitkern.reference``: forward and every gradient, fp32/fp16/bf16, both memory formats, and the kernel
  contract (output_mask, memory format, determinism, argument checks).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import vitkern
from vitkern import reference
from vitkern._backend import emulation_module
from vitkern.testing import assert_close, require_build

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
SELFTEST = CSRC / "emulation" / "selftest_main.cpp"
CXX = shutil.which("g++")
COMPILE = ["-std=c++20", "-pthread", "-DVITKERN_EMULATION=1", f"-I{CSRC}"]
RUNTIME_MODES = ("barrier", "shared", "dynamic_shared", "grid", "shuffle", "atomic")
# Driver modes that run a family of kernels against naive loops; each also runs under both sanitizers.
KERNEL_MODES = ("conv", "attention")
DRIVER_TIMEOUT_S = 600


def _build(out: Path, *flags: str) -> Path:
    assert CXX is not None, "g++ is needed to build the emulation test driver"
    subprocess.run([CXX, *COMPILE, *flags, str(SELFTEST), "-o", str(out)], check=True, capture_output=True, text=True)
    return out


def _run(binary: Path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), mode], capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S)


@pytest.fixture(scope="module")
def selftest(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("emu") / "selftest", "-O1")


@pytest.mark.parametrize("mode", [*RUNTIME_MODES, *KERNEL_MODES])
def test_driver(selftest, mode):
    result = _run(selftest, mode)
    assert result.returncode == 0 and f"{mode} ok" in result.stdout, result.stdout + result.stderr


@pytest.mark.slow
def test_kernels_under_thread_sanitizer(tmp_path):
    binary = _build(tmp_path / "selftest_tsan", "-O1", "-g", "-fsanitize=thread")
    for mode in KERNEL_MODES:
        clean = _run(binary, mode)
        assert clean.returncode == 0 and f"{mode} ok" in clean.stdout, clean.stdout + clean.stderr
        assert "ThreadSanitizer" not in clean.stderr, clean.stderr
    # The sanitizer must see a shared-memory race: this is what a missing __syncthreads() looks like.
    racy = _run(binary, "race")
    assert "WARNING: ThreadSanitizer: data race" in racy.stderr, racy.stdout + racy.stderr
    assert "racy_kernel" in racy.stderr


@pytest.mark.slow
def test_kernels_under_address_sanitizer(tmp_path):
    binary = _build(tmp_path / "selftest_asan", "-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address")
    for mode in KERNEL_MODES:
        clean = _run(binary, mode)
        assert clean.returncode == 0 and f"{mode} ok" in clean.stdout, clean.stdout + clean.stderr
        assert "AddressSanitizer" not in clean.stderr, clean.stderr
    # An out-of-bounds shared-memory write must be reported.
    overflow = _run(binary, "overflow")
    assert overflow.returncode != 0
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in overflow.stderr, overflow.stdout + overflow.stderr
    assert "overflow_kernel" in overflow.stderr


# --- the ops, through vitkern.backend("cuda") on CPU tensors -------------------------------------------------------


@pytest.fixture(scope="module")
def emu():
    require_build(
        emulation_module() is not None, "vitkern._emulation is not built: build with VITKERN_BUILD_EMULATION=1 (README)"
    )
    return torch.ops.vitkern_emu


def _inputs(n, c, h, w, k, stride, dilation, padding, epilogue, channels_last):
    """x, weight and, with ``epilogue``, bias, scale, shift and residual (fp32); x and residual channels_last when
    asked."""
    kh, kw = k
    x = torch.randn(n, c, h, w)
    weight = torch.randn(c, 1, kh, kw) / (kh * kw) ** 0.5
    extra = {}
    if epilogue:
        ref_out = reference.depthwise_conv2d(x, weight, None, stride, padding, dilation)
        extra = {
            "bias": torch.randn(c),
            "scale": torch.randn(c),
            "shift": torch.randn(c),
            "residual": torch.randn(ref_out.shape),
        }
    tensors = {"x": x, "weight": weight, **extra}
    if channels_last:
        tensors["x"] = tensors["x"].contiguous(memory_format=torch.channels_last)
        if "residual" in tensors:
            tensors["residual"] = tensors["residual"].contiguous(memory_format=torch.channels_last)
    return tensors


def _forward_backward(tensors, dy, backend, **kwargs):
    """y and the gradient of every input for upstream gradient dy, on ``backend``."""
    leaves = {name: t.detach().clone().requires_grad_(True) for name, t in tensors.items()}
    with vitkern.backend(backend):
        y = vitkern.ops.depthwise_conv2d(
            leaves["x"],
            leaves["weight"],
            leaves.get("bias"),
            scale=leaves.get("scale"),
            shift=leaves.get("shift"),
            residual=leaves.get("residual"),
            **kwargs,
        )
    grads = torch.autograd.grad(y, list(leaves.values()), dy.to(y.dtype))
    return y, dict(zip(leaves, grads))


# (N, C, H, W), (kh, kw), stride, dilation, padding, activation, channels_last, epilogue
CASES = [
    ((2, 3, 9, 11), (3, 3), 1, 1, "same", "gelu", False, True),
    ((1, 5, 10, 7), (7, 7), 2, 1, 3, "relu", True, True),
    ((1, 4, 12, 13), (5, 3), 1, 2, "same", None, False, False),
    ((1, 8, 9, 9), (9, 9), 1, 1, "same", "gelu", True, True),
    ((2, 3, 11, 10), (4, 6), (2, 1), (2, 1), "same", None, True, True),
    ((1, 6, 7, 8), (1, 1), 1, 1, "valid", "relu", False, True),
    ((1, 3, 8, 9), (3, 5), 2, 2, (2, 1), "gelu", False, True),
    ((1, 5, 6, 17), (2, 2), 1, 1, "valid", None, True, False),
    # sliding-window kernels: channels not a multiple of the channel block, width not a multiple of the run
    ((2, 20, 9, 13), (7, 7), 1, 1, "same", "relu", True, True),
    ((1, 3, 11, 19), (5, 5), 1, 1, "same", None, False, True),
    # NCHW runs of 14 (8-byte window reads) over rows read in vectors of 4 (fp16: 4 too), and runs of 16 (two
    # threads a row, 16-byte vectors and stores in fp16), two rows a thread, an odd height; many planes a block;
    # channels_last runs of 7 and 8 over vectors of 8 channels (fp16) and of 2
    ((1, 3, 10, 28), (7, 7), 1, 1, "same", "gelu", False, True),
    ((1, 5, 6, 32), (9, 9), 1, 1, "same", None, False, True),
    ((2, 7, 5, 14), (3, 3), 1, 1, "same", "relu", False, False),
    ((1, 24, 7, 28), (7, 7), 1, 1, "same", "gelu", True, True),
    ((1, 6, 6, 16), (3, 3), 1, 1, "same", None, True, True),
    ((1, 5, 5, 9), (5, 5), 1, 1, "same", "relu", True, True),  # channels_last, channel by channel
]


def _case_id(case):
    shape, k, stride, dilation, padding, act, cl, ep = case
    layout = "cl" if cl else "nchw"
    fused = "ep" if ep else "plain"
    return f"{'x'.join(map(str, shape))}-k{k[0]}x{k[1]}-s{stride}-d{dilation}-p{padding}-{act}-{layout}-{fused}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_op_fp32_matches_reference(emu, case):
    shape, k, stride, dilation, padding, act, cl, ep = case
    tensors = _inputs(*shape, k, stride, dilation, padding, ep, cl)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, activation=act)
    out = reference.depthwise_conv2d(tensors["x"], tensors["weight"], stride=stride, padding=padding, dilation=dilation)
    dy = torch.randn(out.shape)
    originals = {name: t.clone() for name, t in tensors.items()}
    y, grads = _forward_backward(tensors, dy, "cuda", **kwargs)
    ref_y, ref_grads = _forward_backward(tensors, dy, "eager", **kwargs)
    assert_close(y, ref_y, name="y")
    expected_format = torch.channels_last if cl else torch.contiguous_format
    assert y.is_contiguous(memory_format=expected_format)
    for name in grads:
        assert_close(grads[name], ref_grads[name], name=f"d{name}")
    assert grads["x"].is_contiguous(memory_format=expected_format)
    for name, t in tensors.items():
        assert torch.equal(t, originals[name]), f"{name} was modified"


# The sliding-window cases without bias, scale, shift and residual: their sums (dbias, dscale, dshift) reach ~30 at
# 196 pixels, where one bf16 ulp is 0.25, so against a same-dtype reference they compare rounding against rounding;
# the fp32 test checks them with the epilogue.
WINDOW_LOWP_CASES = [(*case[:7], False) for case in (CASES[10], CASES[11], CASES[13])]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3], *WINDOW_LOWP_CASES], ids=_case_id)
def test_op_low_precision(emu, case, dtype):
    shape, k, stride, dilation, padding, act, cl, ep = case
    tensors32 = _inputs(*shape, k, stride, dilation, padding, ep, cl)
    tensors = {name: t.to(dtype) for name, t in tensors32.items()}
    exact = {name: t.float() for name, t in tensors.items()}  # the same values, in fp32
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, activation=act)
    out = reference.depthwise_conv2d(exact["x"], exact["weight"], stride=stride, padding=padding, dilation=dilation)
    dy = torch.randn(out.shape).to(dtype).float()
    y, grads = _forward_backward(tensors, dy, "cuda", **kwargs)
    ref_y, ref_grads = _forward_backward(exact, dy, "eager", **kwargs)
    same_y, same_grads = _forward_backward(tensors, dy, "eager", **kwargs)
    assert y.dtype == dtype
    assert_close(y, ref_y, same_y, name="y")
    for name in grads:
        assert grads[name].dtype == dtype
        assert_close(grads[name], ref_grads[name], same_grads[name], name=f"d{name}")


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape,k,dilation,cl",
    [((1, 3, 20, 18), (31, 31), 1, False), ((1, 4, 12, 12), (51, 5), 1, True), ((1, 2, 9, 10), (21, 21), 3, False)],
)
def test_op_large_kernels(emu, shape, k, dilation, cl):
    tensors = _inputs(*shape, k, 1, dilation, "same", True, cl)
    out = reference.depthwise_conv2d(tensors["x"], tensors["weight"], dilation=dilation)
    dy = torch.randn(out.shape)
    kwargs = dict(dilation=dilation, activation="gelu")
    y, grads = _forward_backward(tensors, dy, "cuda", **kwargs)
    ref_y, ref_grads = _forward_backward(tensors, dy, "eager", **kwargs)
    assert_close(y, ref_y, name="y")
    for name in grads:
        assert_close(grads[name], ref_grads[name], name=f"d{name}")


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_op_empty_input_rows_padded_to_an_output(emu, cl):
    """An input with no rows, padded into output rows (PyTorch's conv2d refuses it): every sum is 0, so the output
    is the epilogue of the bias alone, checked with its gradients against that closed form. The sliding-window
    kernels, which read the pixel nearest to one outside the input, are not used: there is none."""
    x = torch.randn(1, 4, 0, 8)
    x = x.contiguous(memory_format=torch.channels_last) if cl else x
    tensors = {
        "x": x,
        "weight": torch.randn(4, 1, 3, 3),
        "bias": torch.randn(4),
        "scale": torch.randn(4),
        "shift": torch.randn(4),
        "residual": torch.randn(1, 4, 2, 10),
    }
    dy = torch.randn(1, 4, 2, 10)
    y, grads = _forward_backward(tensors, dy, "cuda", padding=2, activation="gelu")
    leaves = {name: t.clone().requires_grad_(True) for name, t in tensors.items() if name not in ("x", "weight")}
    per_channel = torch.nn.functional.gelu(leaves["bias"]) * leaves["scale"] + leaves["shift"]
    ref_y = per_channel.view(1, 4, 1, 1) + leaves["residual"]
    ref_grads = dict(zip(leaves, torch.autograd.grad(ref_y, list(leaves.values()), dy)))
    assert_close(y, ref_y.detach(), name="y")
    assert grads["x"].shape == x.shape and torch.equal(grads["weight"], torch.zeros_like(grads["weight"]))
    for name, ref in ref_grads.items():
        assert_close(grads[name], ref, name=f"d{name}")


# --- the raw kernel contract ---------------------------------------------------------------------------------------

STRIDE, PADDING, DILATION = [1, 1], [1, 2, 2, 1], [1, 1]
GELU = 1


def _raw_inputs(channels_last=False):
    x = torch.randn(2, 6, 9, 10)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(6, 1, 4, 4)
    scale = torch.randn(6)
    return x, weight, scale


def test_fwd_contract(emu):
    x, weight, scale = _raw_inputs(channels_last=True)
    bias = torch.randn(6)
    y, z = emu.depthwise_conv2d_fwd(x, weight, bias, scale, None, None, STRIDE, PADDING, DILATION, GELU, True)
    padded = torch.nn.functional.pad(x, (PADDING[2], PADDING[3], PADDING[0], PADDING[1]))
    z_ref = torch.nn.functional.conv2d(padded, weight, bias, groups=6)
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, torch.nn.functional.gelu(z_ref) * scale.view(1, -1, 1, 1), rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last) and z.is_contiguous(memory_format=torch.channels_last)
    _, no_z = emu.depthwise_conv2d_fwd(x, weight, bias, None, None, None, STRIDE, PADDING, DILATION, 0, False)
    assert no_z.numel() == 0


@pytest.mark.parametrize(
    "mask",
    [[True, False, False, False, False], [False, True, False, True, False], [False, False, True, False, True]],
)
def test_bwd_output_mask(emu, mask):
    x, weight, scale = _raw_inputs()
    _, z = emu.depthwise_conv2d_fwd(x, weight, None, scale, None, None, STRIDE, PADDING, DILATION, GELU, True)
    dy = torch.randn_like(z)
    full = emu.depthwise_conv2d_bwd(dy, x, weight, z, scale, STRIDE, PADDING, DILATION, GELU, [True] * 5)
    part = emu.depthwise_conv2d_bwd(dy, x, weight, z, scale, STRIDE, PADDING, DILATION, GELU, mask)
    shapes = (x.shape, weight.shape, (6,), (6,), (6,))
    for wanted, got, ref, shape in zip(mask, part, full, shapes):
        if wanted:
            assert got.shape == shape
            assert torch.equal(got, ref)
        else:
            assert got.numel() == 0


@pytest.mark.parametrize("channels_last", [False, True])
def test_bwd_deterministic(emu, channels_last):
    x, weight, scale = _raw_inputs(channels_last)
    _, z = emu.depthwise_conv2d_fwd(x, weight, None, scale, None, None, STRIDE, PADDING, DILATION, GELU, True)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dy = torch.randn(z.shape).contiguous(memory_format=fmt)
    first = emu.depthwise_conv2d_bwd(dy, x, weight, z, scale, STRIDE, PADDING, DILATION, GELU, [True] * 5)
    second = emu.depthwise_conv2d_bwd(dy, x, weight, z, scale, STRIDE, PADDING, DILATION, GELU, [True] * 5)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert first[1].dtype == weight.dtype


@pytest.mark.parametrize(
    "change,exc,needle",
    [
        (dict(weight=torch.randn(5, 1, 3, 3)), ValueError, "weight: expected"),
        (dict(weight=torch.randn(6, 1, 64, 3)), ValueError, "weight: expected"),
        (dict(x=torch.randn(6, 9, 10)), ValueError, "x: expected"),
        (dict(x=torch.randint(0, 3, (2, 6, 9, 10))), TypeError, "x: expected"),
        (dict(bias=torch.randn(6, dtype=torch.float64)), TypeError, "bias: expected"),
        (dict(bias=torch.randn(5)), ValueError, "bias: expected"),
        (dict(stride=[0, 1]), ValueError, "stride: expected"),
        (dict(padding=[1, 1]), ValueError, "padding: expected"),
        (dict(dilation=[1, 0]), ValueError, "dilation: expected"),
        (dict(activation=3), ValueError, "activation: expected"),
        (dict(residual=torch.randn(2, 6, 9, 9)), ValueError, "residual: expected"),
    ],
)
def test_fwd_argument_checks(emu, change, exc, needle):
    x, weight, _ = _raw_inputs()
    args = dict(
        x=x,
        weight=weight,
        bias=None,
        scale=None,
        shift=None,
        residual=None,
        stride=STRIDE,
        padding=PADDING,
        dilation=DILATION,
        activation=0,
        save_z=False,
    )
    args.update(change)
    with pytest.raises(exc, match=needle):
        emu.depthwise_conv2d_fwd(*args.values())


def test_bwd_needs_z_for_activation(emu):
    x, weight, _ = _raw_inputs()
    y, _ = emu.depthwise_conv2d_fwd(x, weight, None, None, None, None, STRIDE, PADDING, DILATION, GELU, False)
    mask = [True, True, False, False, False]
    with pytest.raises(ValueError, match="z: expected shape"):
        emu.depthwise_conv2d_bwd(
            torch.randn_like(y), x, weight, torch.empty(0), None, STRIDE, PADDING, DILATION, GELU, mask
        )
