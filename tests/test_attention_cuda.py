"""The CUDA C++ attention kernels (csrc/attention_kernels.cuh) against the plain-PyTorch reference.

On a machine without a GPU backend "cuda" runs them through the emulation build (vitkern._emulation) on CPU
tensors: fp32, fp16 and bf16 (the emulation runs bf16), every bias mode, windows 1x1 to 14x14, LeViT resolutions
4/7/14 with stride 1 and 2, unequal value dims, token counts around the 16-row blocks and 32-key lane strides, a
sequence above the 256-key resident tile (key-tile streaming), the Swin window mask of the ops' contract, every
gradient; bitwise-deterministic table gradients, the no-(B, heads, Nq, Nk)-allocation check, opcheck of the custom
op on the cuda family, torch.compile, and bad input rejected before any kernel runs. The emulation runs each block's
threads as OS threads, so shapes stay small.
"""

from __future__ import annotations

import pytest
import torch

import vitkern
from vitkern import _backend, reference
from vitkern.testing import assert_close, large_allocations, require_build

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module", autouse=True)
def _built():
    require_build(
        (_backend.cuda_module() if ON_GPU else _backend.emulation_module()) is not None,
        "the CUDA C++ build for this device is missing: reinstall with VITKERN_BUILD_EMULATION=1 (CPU) or a CUDA "
        "toolkit (GPU)",
    )


def _ops():
    return torch.ops.vitkern_cuda if ON_GPU else torch.ops.vitkern_emu


def _qkv(batch, heads, nq, nk, d, dv, dtype):
    q = torch.randn(batch, heads, nq, d, device=DEVICE).to(dtype)
    k = torch.randn(batch, heads, nk, d, device=DEVICE).to(dtype)
    v = torch.randn(batch, heads, nk, dv, device=DEVICE).to(dtype)
    return q, k, v


def _run(fn, tensors, dout, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves, **kwargs)
    return out.detach(), torch.autograd.grad(out, leaves, dout)


def _check(op, ref_op, tensors, names, **kwargs):
    """The op on backend "cuda" against the reference: fp32 at 1e-4; fp16/bf16 within 2x the same-dtype
    reference's error against the fp32 reference. Inputs must come back unmodified."""
    dtype = tensors[0].dtype
    batch, heads, nq, _ = tensors[0].shape
    dout = torch.randn(batch, heads, nq, tensors[2].shape[-1], device=DEVICE)
    originals = [t.clone() for t in tensors]
    with vitkern.backend("cuda"):
        out, grads = _run(op, tensors, dout.to(dtype), **kwargs)
    for name, tensor, original in zip(names, tensors, originals):
        assert torch.equal(tensor, original), f"{name} was modified in place"
    ref_out, ref_grads = _run(ref_op, [t.float() for t in tensors], dout, **kwargs)
    same_out, same_grads = None, [None] * len(tensors)
    if dtype != torch.float32:
        same_out, same_grads = _run(ref_op, tensors, dout.to(dtype), **kwargs)
    assert_close(out, ref_out, same_out, name="out")
    for name, tensor, grad, ref_grad, same_grad in zip(names, tensors, grads, ref_grads, same_grads):
        assert grad.shape == tensor.shape and grad.dtype == tensor.dtype
        assert_close(grad, ref_grad, same_grad, name=f"d{name}")


REL_POS_CASES = [
    # (window, d, dv, dtype)
    ((1, 1), 16, 16, torch.float32),
    ((2, 3), 16, 32, torch.float32),
    ((4, 4), 32, 32, torch.float16),
    ((4, 4), 16, 16, torch.bfloat16),
    ((1, 17), 64, 16, torch.float32),  # one past a 16-row block
    ((7, 7), 32, 16, torch.float32),
    ((7, 7), 16, 32, torch.bfloat16),
    pytest.param((7, 7), 64, 64, torch.float16, marks=pytest.mark.slow),
    pytest.param((14, 14), 16, 16, torch.float32, marks=pytest.mark.slow),
    pytest.param((8, 8), 128, 96, torch.bfloat16, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("window, d, dv, dtype", REL_POS_CASES)
def test_rel_pos_attention(window, d, dv, dtype):
    tokens = window[0] * window[1]
    batch, heads = (2, 2) if tokens <= 16 else (1, 2)
    q, k, v = _qkv(batch, heads, tokens, tokens, d, dv, dtype)
    # A transposed view: the kernel reads the table through its strides.
    table = torch.randn(heads, (2 * window[0] - 1) * (2 * window[1] - 1), device=DEVICE).t().to(dtype)
    _check(
        vitkern.ops.rel_pos_attention, reference.rel_pos_attention, [q, k, v, table], "qkvt", window=window, scale=0.3
    )


LEVIT_CASES = [
    # (resolution, stride, d, dv, dtype)
    (4, 1, 16, 32, torch.float32),
    (4, 2, 16, 64, torch.float16),  # 4 queries: four (batch, head) pairs share a block
    (4, 2, 16, 16, torch.bfloat16),
    (7, 1, 16, 32, torch.float32),
    (7, 2, 32, 64, torch.bfloat16),
    (5, 3, 8, 16, torch.float32),
    pytest.param(14, 2, 16, 64, torch.float32, marks=pytest.mark.slow),
    pytest.param(14, 1, 32, 32, torch.float16, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("resolution, stride, d, dv, dtype", LEVIT_CASES)
def test_levit_attention(resolution, stride, d, dv, dtype):
    res_q = (resolution - 1) // stride + 1
    batch, heads = (3, 2) if resolution <= 4 else (1, 2)
    q, k, v = _qkv(batch, heads, res_q * res_q, resolution * resolution, d, dv, dtype)
    biases = torch.randn(heads, resolution * resolution, device=DEVICE).to(dtype)
    _check(
        vitkern.ops.levit_attention,
        reference.levit_attention,
        [q, k, v, biases],
        "qkvb",
        resolution=resolution,
        stride=stride,
    )


DENSE_CASES = [
    # (batch, heads, nq, nk, d, dv, bias shape or None, dtype)
    (2, 2, 1, 1, 16, 16, None, torch.float32),
    (2, 2, 15, 17, 8, 8, None, torch.float32),
    (1, 2, 16, 33, 16, 32, None, torch.bfloat16),
    (2, 3, 17, 15, 16, 16, (2, 3, 17, 15), torch.float32),
    (2, 3, 16, 33, 32, 16, (1, 3, 16, 33), torch.float16),
    (2, 3, 20, 20, 16, 16, (2, 1, 20, 20), torch.bfloat16),
    (2, 2, 9, 12, 16, 8, (1, 1, 1, 12), torch.float32),
    (1, 2, 3, 70, 16, 16, (1, 2, 1, 70), torch.float32),
]


@pytest.mark.parametrize("batch, heads, nq, nk, d, dv, bias_shape, dtype", DENSE_CASES)
def test_biased_attention(batch, heads, nq, nk, d, dv, bias_shape, dtype):
    q, k, v = _qkv(batch, heads, nq, nk, d, dv, dtype)
    if bias_shape is None:
        _check(vitkern.ops.biased_attention, reference.biased_attention, [q, k, v], "qkv")
    else:
        bias = torch.randn(bias_shape, device=DEVICE).to(dtype)
        _check(vitkern.ops.biased_attention, reference.biased_attention, [q, k, v, bias], "qkvb")


@pytest.mark.slow
def test_long_sequence_streams_over_key_tiles():
    """17 x 17 = 289 keys: more than the 256-key resident tile, so the forward streams (online softmax) and the
    backward sums dq over two key tiles and the table gradient over their partials."""
    q, k, v = _qkv(1, 1, 289, 289, 16, 16, torch.float32)
    table = torch.randn(33 * 33, 1, device=DEVICE)
    _check(vitkern.ops.rel_pos_attention, reference.rel_pos_attention, [q, k, v, table], "qkvt", window=(17, 17))


def test_key_tiles_of_a_wide_head():
    """Head dim 128: the shared memory holds 128 keys at a time, so 130 keys take two tiles (without the slow
    mark: the streaming path in the fast set)."""
    q, k, v = _qkv(1, 1, 5, 130, 128, 128, torch.float32)
    bias = torch.randn(1, 1, 5, 130, device=DEVICE)
    _check(vitkern.ops.biased_attention, reference.biased_attention, [q, k, v, bias], "qkvb")


def test_fully_masked_rows_give_zeros():
    q, k, v = _qkv(2, 2, 17, 19, 16, 16, torch.float32)
    bias = torch.randn(1, 2, 17, 19, device=DEVICE)
    bias[0, 0, 3] = float("-inf")
    bias[0, :, :, 5] = float("-inf")
    with vitkern.backend("cuda"):
        out, (dq, _, _, dbias) = _run(vitkern.ops.biased_attention, [q, k, v, bias], torch.ones_like(q))
    assert torch.equal(out[:, 0, 3], torch.zeros_like(out[:, 0, 3]))
    assert torch.equal(dq[:, 0, 3], torch.zeros_like(dq[:, 0, 3]))
    assert torch.equal(dbias[0, :, :, 5], torch.zeros_like(dbias[0, :, :, 5]))
    _check(vitkern.ops.biased_attention, reference.biased_attention, [q, k, v, bias], "qkvb")


# --- the window mask of the kernel contract (the C++ ops take it directly) --------------------------------------


def _masked_reference(q, k, v, bias4, mask, scale):
    windows = mask.shape[0]
    full = mask.repeat(q.shape[0] // windows, 1, 1).unsqueeze(1)
    return reference.biased_attention(q, k, v, full if bias4 is None else bias4 + full, scale)


@pytest.mark.parametrize("bias_mode", [0, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_added_per_window(bias_mode, dtype):
    """Swin's shifted windows: 4 batch entries over 2 windows, a mask of 0 / -inf (one fully masked row)."""
    batch, heads, window = 4, 2, (4, 4)
    tokens = window[0] * window[1]
    q, k, v = _qkv(batch, heads, tokens, tokens, 16, 16, dtype)
    mask = torch.zeros(2, tokens, tokens, device=DEVICE)
    mask[1, :, 3:7] = float("-inf")
    mask[0, 5, :] = float("-inf")
    mask = mask.to(dtype)
    scale = 0.25
    geometry = list(window) if bias_mode == 1 else []
    table = torch.randn(49, heads, device=DEVICE).to(dtype) if bias_mode == 1 else None
    bias = torch.randn(1, heads, tokens, tokens, device=DEVICE).to(dtype) if bias_mode == 3 else None
    param = table if bias_mode == 1 else bias
    out, lse = _ops().attention_fwd(q, k, v, param, mask, bias_mode, geometry, scale)
    dout = torch.randn_like(out)
    grads = _ops().attention_bwd(dout, q, k, v, out, lse, param, mask, bias_mode, geometry, scale, param is not None)

    def ref(q, k, v, *p, to_float=True):
        bias4 = None
        if bias_mode == 1:
            bias4 = reference.rel_pos_bias(p[0], window).unsqueeze(0)
        elif bias_mode == 3:
            bias4 = p[0]
        return _masked_reference(q, k, v, bias4, mask.float() if to_float else mask, scale)

    tensors = [q, k, v] + ([param] if param is not None else [])
    ref_out, ref_grads = _run(ref, [t.float() for t in tensors], dout.float())
    same_out, same_grads = None, [None] * len(tensors)
    if dtype != torch.float32:
        same_out, same_grads = _run(lambda *t: ref(*t, to_float=False), tensors, dout)
    assert torch.equal(out[0::2, :, 5], torch.zeros_like(out[0::2, :, 5]))
    assert_close(out, ref_out, same_out, name="out")
    for name, grad, ref_grad, same_grad in zip("qkvb", grads, ref_grads, same_grads):
        assert_close(grad, ref_grad, same_grad, name=f"d{name}")


# --- determinism and memory -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["rel_pos", "levit", "dense"])
def test_bias_gradient_is_bitwise_deterministic(mode):
    """Several batch entries summed into one gradient, two runs, identical bits."""
    if mode == "rel_pos":
        q, k, v = _qkv(3, 2, 6, 6, 16, 16, torch.float32)
        param = torch.randn(15, 2, device=DEVICE)
        op = lambda *t: vitkern.ops.rel_pos_attention(*t, window=(2, 3))  # noqa: E731
    elif mode == "levit":
        q, k, v = _qkv(3, 2, 4, 16, 16, 32, torch.float32)
        param = torch.randn(2, 16, device=DEVICE)
        op = lambda *t: vitkern.ops.levit_attention(*t, resolution=4, stride=2)  # noqa: E731
    else:
        q, k, v = _qkv(3, 2, 7, 9, 16, 16, torch.float32)
        param = torch.randn(1, 1, 7, 9, device=DEVICE)
        op = vitkern.ops.biased_attention
    dout = torch.randn(3, 2, q.shape[2], v.shape[3], device=DEVICE)
    with vitkern.backend("cuda"):
        first = _run(op, [q, k, v, param], dout)[1][3]
        second = _run(op, [q, k, v, param], dout)[1][3]
    assert torch.equal(first, second)


@pytest.mark.skipif(ON_GPU, reason="the profiler's allocation records are taken on CPU tensors")
@pytest.mark.parametrize("mode", ["rel_pos", "levit"])
def test_fused_paths_never_allocate_a_score_matrix(mode):
    """No allocation of B*H*Nq*Nk fp32 elements or more, forward or backward (the table partials are
    (chunks, key tiles, heads, entries)); the same check flags the reference."""
    batch, heads = 1, 2
    if mode == "rel_pos":
        q, k, v = _qkv(batch, heads, 49, 49, 16, 16, torch.float32)
        tensors = [q, k, v, torch.randn(169, heads)]

        def op(*t):
            return vitkern.ops.rel_pos_attention(*t, window=(7, 7))
    else:
        q, k, v = _qkv(batch, heads, 16, 49, 8, 8, torch.float32)
        tensors = [q, k, v, torch.randn(heads, 49)]

        def op(*t):
            return vitkern.ops.levit_attention(*t, resolution=7, stride=2)

    threshold = batch * heads * q.shape[2] * k.shape[2] * 4
    dout = torch.randn(batch, heads, q.shape[2], v.shape[3])
    with vitkern.backend("cuda"):
        assert large_allocations(lambda: _run(op, tensors, dout), threshold) == []
    with vitkern.backend("eager"):
        assert large_allocations(lambda: _run(op, tensors, dout), threshold) != []


# --- custom ops -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0, 2, 3])
def test_opcheck(mode):
    """The custom op on the cuda family (forward, and its backward op on the forward's results)."""
    backend = "cuda" if ON_GPU else "cuda-emulated"
    geometry, bias = [], None
    if mode == 2:
        q, k, v = _qkv(2, 2, 4, 16, 16, 16, torch.float32)
        bias, geometry = torch.randn(2, 16, device=DEVICE), [4, 2]
    else:
        q, k, v = _qkv(2, 2, 5, 7, 8, 16, torch.float32)
        if mode == 3:
            bias = torch.randn(1, 2, 5, 7, device=DEVICE)
    grad_args = [t.clone().requires_grad_() for t in (q, k, v)]
    grad_bias = None if bias is None else bias.clone().requires_grad_()
    torch.library.opcheck(torch.ops.vitkern.attention, (*grad_args, grad_bias, None, mode, geometry, 0.25, backend))
    out, lse = _ops().attention_fwd(q, k, v, bias, None, mode, geometry, 0.25)
    args = (torch.randn_like(out), q, k, v, out, lse, bias, None, mode, geometry, 0.25, bias is not None, backend)
    torch.library.opcheck(torch.ops.vitkern.attention_backward, args)


def test_compile_fullgraph_matches_eager():
    q, k, v = _qkv(2, 2, 6, 6, 16, 16, torch.float32)
    table = torch.randn(15, 2, device=DEVICE)

    def fn(q, k, v, table):
        return vitkern.ops.rel_pos_attention(q, k, v, table, (2, 3))

    torch._dynamo.reset()
    with vitkern.backend("cuda"):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, table)
        eager = fn(q, k, v, table)
    assert torch.equal(compiled, eager)
    assert_close(eager, reference.rel_pos_attention(q, k, v, table, (2, 3)))


# --- bad input --------------------------------------------------------------------------------------------------


def _bad_kernel_calls():
    q, k, v = _qkv(2, 2, 6, 6, 16, 16, torch.float32)
    wide = torch.randn(1, 1, 4, 136, device=DEVICE)
    table = torch.randn(15, 2, device=DEVICE)
    return [
        (ValueError, "q", lambda: _ops().attention_fwd(wide, wide, wide, None, None, 0, [], 0.1)),
        (ValueError, "v", lambda: _ops().attention_fwd(q, k, torch.randn(2, 2, 6, 130), None, None, 0, [], 0.1)),
        (TypeError, "k", lambda: _ops().attention_fwd(q, k.double(), v, None, None, 0, [], 0.1)),
        (ValueError, "bias", lambda: _ops().attention_fwd(q, k, v, torch.randn(14, 2), None, 1, [2, 3], 0.1)),
        (ValueError, "bias", lambda: _ops().attention_fwd(q, k, v, None, None, 1, [2, 3], 0.1)),
        (ValueError, "geometry", lambda: _ops().attention_fwd(q, k, v, table, None, 1, [2], 0.1)),
        (ValueError, "bias_mode", lambda: _ops().attention_fwd(q, k, v, None, None, 4, [], 0.1)),
        (ValueError, "mask", lambda: _ops().attention_fwd(q, k, v, None, torch.zeros(3, 6, 6), 0, [], 0.1)),
        (ValueError, "mask", lambda: _ops().attention_fwd(q, k, v, None, torch.zeros(1, 6, 5), 0, [], 0.1)),
        (TypeError, "mask", lambda: _ops().attention_fwd(q, k, v, None, torch.zeros(1, 6, 6).half(), 0, [], 0.1)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_kernel_calls())))
def test_bad_input_raises_naming_the_argument(case):
    error, name, call = _bad_kernel_calls()[case]
    with pytest.raises(error, match=rf"^{name}:"):
        call()
