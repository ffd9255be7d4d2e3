"""The fused attention ops (``rel_pos_attention``, ``levit_attention``, ``biased_attention``) on the Triton kernels
against the plain-PyTorch reference: forward and every gradient, for every bias mode, fp32 and fp16.

Also: the reference's gathered biases against the seed articles' index code written out here, gradcheck of the
reference in fp64, bitwise determinism of the table gradients, an allocation check (no (B, H, Nq, Nk) buffer in the
fused paths, forward or backward), fully masked rows, ``torch.library.opcheck`` of the custom ops, and bad input.
On a machine without a GPU the kernels run under the Triton interpreter (the repository's conftest.py), so shapes
stay small.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import vitkern
from vitkern import _tuning, reference
from vitkern.kernels import attention as kernels
from vitkern.testing import assert_close, large_allocations

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The Triton kernels, and "auto": on CPU tensors the CPU path, on CUDA tensors the Triton kernels again.
BACKENDS = ["triton", "auto"]


# --- helpers ----------------------------------------------------------------------------------------------------


def _qkv(batch, heads, nq, nk, d, dv, dtype=torch.float32, strided=False):
    """Random q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv); ``strided`` makes them views of (B, N, H, D)
    tensors, as a model's qkv projection produces them."""
    if strided:
        q = torch.randn(batch, nq, heads, d, device=DEVICE).transpose(1, 2)
        k = torch.randn(batch, nk, heads, d, device=DEVICE).transpose(1, 2)
        v = torch.randn(batch, nk, heads, dv, device=DEVICE).transpose(1, 2)
    else:
        q = torch.randn(batch, heads, nq, d, device=DEVICE)
        k = torch.randn(batch, heads, nk, d, device=DEVICE)
        v = torch.randn(batch, heads, nk, dv, device=DEVICE)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _run(fn, tensors, dout, **kwargs):
    """fn(*tensors, **kwargs) and the gradients of <out, dout> with respect to every tensor (leaves are copies)."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves, **kwargs)
    grads = torch.autograd.grad(out, leaves, dout)
    return out.detach(), grads


def _check(op, ref_op, tensors, names, backend="triton", **kwargs):
    """The op on ``backend`` against the reference: fp32 at the DESIGN.md tolerance; fp16 within 2x the fp16
    reference's error against the fp32 reference."""
    dtype = tensors[0].dtype
    batch, heads, nq, _ = tensors[0].shape
    dout = torch.randn(batch, heads, nq, tensors[2].shape[-1], device=DEVICE)
    originals = [t.clone() for t in tensors]
    with vitkern.backend(backend):
        out, grads = _run(op, tensors, dout.to(dtype), **kwargs)
    for name, tensor, original in zip(names, tensors, originals):
        assert torch.equal(tensor, original), f"{name} was modified in place"
    ref_out, ref_grads = _run(ref_op, [t.float() for t in tensors], dout, **kwargs)
    same_out, same_grads = (None, [None] * len(tensors))
    if dtype != torch.float32:
        same_out, same_grads = _run(ref_op, tensors, dout.to(dtype), **kwargs)
    assert_close(out, ref_out, same_out, name="out")
    for name, tensor, grad, ref_grad, same_grad in zip(names, tensors, grads, ref_grads, same_grads):
        assert grad.shape == tensor.shape
        assert_close(grad, ref_grad, same_grad, name=f"d{name}")


# --- the reference against the seed code ------------------------------------------------------------------------


def _seed_coatnet_index(ih: int, iw: int) -> torch.Tensor:
    """``relative_index`` of the seed's CoAtNet ``Attention`` (shared/seeds/coatnet_article.txt), as (N, N)."""
    coords = torch.meshgrid((torch.arange(ih), torch.arange(iw)), indexing="ij")
    coords = torch.flatten(torch.stack(coords), 1)
    relative_coords = coords[:, :, None] - coords[:, None, :]
    relative_coords[0] += ih - 1
    relative_coords[1] += iw - 1
    relative_coords[0] *= 2 * iw - 1
    relative_coords = relative_coords.permute(1, 2, 0)
    return relative_coords.sum(-1)


def _seed_levit_index(fmap_size: int, downsample: bool) -> torch.Tensor:
    """``pos_indices`` of the seed's LeViT attention (vit-pytorch's levit.py in the seed article)."""
    q_range = torch.arange(0, fmap_size, step=2 if downsample else 1)
    k_range = torch.arange(fmap_size)
    q_pos = torch.stack(torch.meshgrid(q_range, q_range, indexing="ij"), dim=-1).reshape(-1, 2)
    k_pos = torch.stack(torch.meshgrid(k_range, k_range, indexing="ij"), dim=-1).reshape(-1, 2)
    rel_pos = (q_pos[:, None, ...] - k_pos[None, :, ...]).abs()
    x_rel, y_rel = rel_pos.unbind(dim=-1)
    return x_rel * fmap_size + y_rel


def _timm_levit_index(resolution: int, stride: int) -> torch.Tensor:
    """timm's ``AttentionDownsample`` / ``Attention`` ``attention_bias_idxs`` (itertools form)."""
    res_q = (resolution - 1) // stride + 1
    k_pos = list(itertools.product(range(resolution), range(resolution)))
    q_pos = list(itertools.product(range(res_q), range(res_q)))
    index = [[abs(qy * stride - ky) * resolution + abs(qx * stride - kx) for ky, kx in k_pos] for qy, qx in q_pos]
    return torch.tensor(index)


@pytest.mark.parametrize("window", [(1, 1), (2, 3), (7, 7), (5, 2)])
def test_reference_rel_pos_index_matches_seed(window):
    assert torch.equal(reference.rel_pos_index(window), _seed_coatnet_index(*window))
    table = torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), 3)
    expected = table.gather(0, _seed_coatnet_index(*window).reshape(-1, 1).repeat(1, 3))
    expected = expected.reshape(window[0] * window[1], window[0] * window[1], 3).permute(2, 0, 1)
    assert torch.equal(reference.rel_pos_bias(table, window), expected)


@pytest.mark.parametrize("resolution", [4, 7, 14])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_reference_levit_index_matches_timm(resolution, stride):
    assert torch.equal(reference.levit_index(resolution, stride), _timm_levit_index(resolution, stride))
    if stride in (1, 2):
        assert torch.equal(reference.levit_index(resolution, stride), _seed_levit_index(resolution, stride == 2))


def test_reference_gradcheck_fp64():
    q, k, v = (t.double().cpu().requires_grad_() for t in _qkv(1, 2, 6, 6, 4, 5))
    table = torch.randn(15, 2, dtype=torch.float64, requires_grad=True)
    rel_pos = lambda *a: reference.rel_pos_attention(*a, (2, 3))  # noqa: E731
    assert torch.autograd.gradcheck(rel_pos, (q, k, v, table), fast_mode=True)
    q4 = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    k9, v9 = (torch.randn(1, 2, 9, n, dtype=torch.float64, requires_grad=True) for n in (4, 3))
    biases = torch.randn(2, 9, dtype=torch.float64, requires_grad=True)
    levit = lambda *a: reference.levit_attention(*a, 3, 2)  # noqa: E731
    assert torch.autograd.gradcheck(levit, (q4, k9, v9, biases), fast_mode=True)
    bias = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(reference.biased_attention, (q, k, v, bias), fast_mode=True)


# --- forward and gradients against the reference ----------------------------------------------------------------

REL_POS_CASES = [
    ((1, 1), 16, 16, torch.float32),
    ((2, 3), 16, 16, torch.float32),
    ((2, 3), 8, 24, torch.float16),
    ((4, 4), 32, 32, torch.float16),
    ((7, 7), 16, 32, torch.float32),
    ((3, 6), 64, 64, torch.float32),
    ((1, 40), 16, 16, torch.float32),  # rows wider than an x-block, more column offsets than a bin block
    pytest.param((7, 7), 32, 32, torch.float16, marks=pytest.mark.slow),
    pytest.param((14, 14), 16, 16, torch.float32, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("window, d, dv, dtype", REL_POS_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rel_pos_attention(backend, window, d, dv, dtype):
    tokens = window[0] * window[1]
    batch, heads = (2, 2) if tokens <= 16 else (1, 2) if tokens <= 64 else (1, 1)
    q, k, v = _qkv(batch, heads, tokens, tokens, d, dv, dtype, strided=True)
    table = torch.randn(heads, (2 * window[0] - 1) * (2 * window[1] - 1), device=DEVICE).t().to(dtype)
    _check(
        vitkern.ops.rel_pos_attention,
        reference.rel_pos_attention,
        [q, k, v, table],
        "qkvt",
        backend,
        window=window,
        scale=0.3,
    )


LEVIT_CASES = [
    (4, 1, 16, 32, torch.float32),
    (4, 2, 16, 64, torch.float16),
    (7, 1, 16, 32, torch.float16),
    (7, 2, 32, 64, torch.float32),
    (5, 3, 8, 16, torch.float32),
    pytest.param(14, 2, 16, 64, torch.float32, marks=pytest.mark.slow),
    pytest.param(14, 1, 32, 64, torch.float16, marks=pytest.mark.slow),
    pytest.param(17, 3, 16, 16, torch.float32, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("resolution, stride, d, dv, dtype", LEVIT_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_levit_attention(backend, resolution, stride, d, dv, dtype):
    res_q = (resolution - 1) // stride + 1
    batch, heads = (2, 2) if resolution <= 4 else (1, 2) if resolution <= 7 else (1, 1)
    q, k, v = _qkv(batch, heads, res_q * res_q, resolution * resolution, d, dv, dtype)
    biases = torch.randn(heads, resolution * resolution, device=DEVICE, dtype=dtype)
    _check(
        vitkern.ops.levit_attention,
        reference.levit_attention,
        [q, k, v, biases],
        "qkvb",
        backend,
        resolution=resolution,
        stride=stride,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_levit_attention_transposed_biases(backend):
    """vit-pytorch keeps the biases as nn.Embedding(R*R, heads).weight: a transposed view is read in place."""
    q, k, v = _qkv(1, 3, 9, 25, 16, 16)
    biases = torch.randn(25, 3, device=DEVICE).t()
    _check(
        vitkern.ops.levit_attention,
        reference.levit_attention,
        [q, k, v, biases],
        "qkvb",
        backend,
        resolution=5,
        stride=2,
    )


DENSE_CASES = [
    # (batch, heads, nq, nk, d, dv, bias shape or None, dtype)
    (2, 2, 1, 1, 16, 16, None, torch.float32),
    (2, 2, 15, 17, 8, 8, None, torch.float32),
    (1, 2, 16, 16, 16, 32, None, torch.float16),
    (1, 1, 65, 63, 64, 16, None, torch.float32),
    (2, 3, 17, 15, 16, 16, (2, 3, 17, 15), torch.float32),
    (2, 3, 16, 33, 32, 16, (1, 3, 16, 33), torch.float32),
    (2, 3, 20, 20, 16, 16, (2, 1, 20, 20), torch.float16),
    (2, 2, 9, 12, 16, 8, (1, 1, 1, 12), torch.float32),
    (1, 2, 3, 70, 16, 16, (1, 2, 1, 70), torch.float32),
    (2, 2, 65, 65, 16, 16, (1, 2, 65, 65), torch.float16),
]


@pytest.mark.parametrize("batch, heads, nq, nk, d, dv, bias_shape, dtype", DENSE_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_biased_attention(backend, batch, heads, nq, nk, d, dv, bias_shape, dtype):
    q, k, v = _qkv(batch, heads, nq, nk, d, dv, dtype)
    if bias_shape is None:
        _check(vitkern.ops.biased_attention, reference.biased_attention, [q, k, v], "qkv", backend)
    else:
        bias = torch.randn(bias_shape, device=DEVICE, dtype=dtype)
        _check(vitkern.ops.biased_attention, reference.biased_attention, [q, k, v, bias], "qkvb", backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_give_zeros(backend):
    q, k, v = _qkv(2, 2, 17, 19, 16, 16)
    bias = torch.randn(1, 2, 17, 19, device=DEVICE)
    bias[0, 0, 3] = float("-inf")
    bias[0, 1, 16] = float("-inf")
    bias[0, :, :, 5] = float("-inf")
    with vitkern.backend(backend):
        out, (dq, dk, dv, dbias) = _run(vitkern.ops.biased_attention, [q, k, v, bias], torch.ones_like(q))
    assert torch.equal(out[:, 0, 3], torch.zeros_like(out[:, 0, 3]))
    assert torch.equal(out[:, 1, 16], torch.zeros_like(out[:, 1, 16]))
    assert torch.equal(dq[:, 0, 3], torch.zeros_like(dq[:, 0, 3]))
    assert torch.equal(dbias[0, 0, 3], torch.zeros_like(dbias[0, 0, 3]))
    assert torch.equal(dbias[0, :, :, 5], torch.zeros_like(dbias[0, :, :, 5]))
    _check(vitkern.ops.biased_attention, reference.biased_attention, [q, k, v, bias], "qkvb", backend)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU path runs on CPU tensors")
@pytest.mark.parametrize("choice", ["matmul", "sdpa"])
@pytest.mark.parametrize("mode", ["rel_pos", "levit", "dense", "dense-1d"])
def test_cpu_path_forward_candidates(monkeypatch, mode, choice):
    """Without gradients the CPU path measures matmul-softmax against SDPA; each candidate gives the reference's
    output (the "measurement" here returns the candidate under test, after running both once)."""
    calls = []

    def choose(key, make_candidates, default):
        candidates = make_candidates()
        assert set(candidates) == {"matmul", "sdpa"} and default == "matmul"
        for run in candidates.values():
            run()
        calls.append(key)
        return choice

    monkeypatch.setattr(_tuning, "MIN_TUNED_MACS", 0)
    monkeypatch.setattr(_tuning, "MIN_TUNED_FORWARD_MACS", 0)
    monkeypatch.setattr(_tuning, "choose", choose)
    if mode == "rel_pos":
        q, k, v = _qkv(2, 3, 12, 12, 16, 16, strided=True)
        args, kwargs = (torch.randn(35, 3),), dict(window=(3, 4), scale=0.3)
        op, ref_op = vitkern.ops.rel_pos_attention, reference.rel_pos_attention
    elif mode == "levit":
        q, k, v = _qkv(2, 3, 16, 49, 16, 32)
        args, kwargs = (torch.randn(3, 49),), dict(resolution=7, stride=2)
        op, ref_op = vitkern.ops.levit_attention, reference.levit_attention
    else:
        q, k, v = _qkv(2, 3, 10, 13, 16, 16)
        bias_shape = (2, 1, 10, 13) if mode == "dense" else (13,)
        args, kwargs = (torch.randn(bias_shape),), {}
        op, ref_op = vitkern.ops.biased_attention, reference.biased_attention
    with torch.no_grad(), vitkern.backend("auto"):
        out = op(q, k, v, *args, **kwargs)
    assert len(calls) == 1, "the CPU path did not ask for a measured choice"
    assert_close(out, ref_op(q, k, v, *args, **kwargs))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU path runs on CPU tensors")
@pytest.mark.parametrize("mode", ["rel_pos", "levit"])
def test_cpu_path_trains_after_an_inference_mode_call(mode):
    """The CPU path keeps each window's gather index; one first built under torch.inference_mode must still serve
    a later call with gradients."""
    q, k, v = _qkv(1, 2, 4, 16, 16, 16)
    if mode == "rel_pos":  # a window no other test uses, so this test builds its index first
        q = q[:, :, :3]
        op, args = vitkern.ops.rel_pos_attention, (torch.randn(5, 2), (1, 3))
        k, v = k[:, :, :3], v[:, :, :3]
    else:
        op, args = vitkern.ops.levit_attention, (torch.randn(2, 16), 4, 3)
    with vitkern.backend("auto"):
        with torch.inference_mode():
            op(q, k, v, *args)
        table = args[0].requires_grad_()
        op(q, k, v, *args).sum().backward()
    assert table.grad is not None and table.grad.abs().sum() > 0


# --- determinism and memory -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["rel_pos", "levit"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_table_gradient_is_bitwise_deterministic(backend, mode):
    """Several batch chunks (partials summed over chunks), two runs, identical bits."""
    if mode == "rel_pos":
        q, k, v = _qkv(3, 2, 6, 6, 16, 16)
        table = torch.randn(15, 2, device=DEVICE)
        op = lambda *t: vitkern.ops.rel_pos_attention(*t, window=(2, 3))  # noqa: E731
        tensors = [q, k, v, table]
    else:
        q, k, v = _qkv(3, 2, 4, 16, 16, 32)
        biases = torch.randn(2, 16, device=DEVICE)
        op = lambda *t: vitkern.ops.levit_attention(*t, resolution=4, stride=2)  # noqa: E731
        tensors = [q, k, v, biases]
    dout = torch.randn(3, 2, q.shape[2], v.shape[3], device=DEVICE)
    with vitkern.backend(backend):
        first = _run(op, tensors, dout)[1][3]
        second = _run(op, tensors, dout)[1][3]
    assert torch.equal(first, second)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the profiler's allocation records are taken on CPU tensors")
@pytest.mark.parametrize("mode", ["rel_pos", "levit"])
def test_fused_paths_never_allocate_a_score_matrix(mode):
    """No allocation of B*H*Nq*Nk fp32 elements (every tensor here is fp32) or more in forward or backward; every
    legitimate buffer (q, k, v, their gradients, lse, the table partials) is smaller. The same check flags the
    reference, which does materialise the scores."""
    batch, heads = 1, 2
    if mode == "rel_pos":
        q, k, v = _qkv(batch, heads, 49, 49, 16, 16)
        table = torch.randn(169, heads)

        def op(*t):
            return vitkern.ops.rel_pos_attention(*t, window=(7, 7))

        tensors = [q, k, v, table]
    else:
        q, k, v = _qkv(batch, heads, 16, 49, 8, 8)
        biases = torch.randn(heads, 49)

        def op(*t):
            return vitkern.ops.levit_attention(*t, resolution=7, stride=2)

        tensors = [q, k, v, biases]
    threshold = batch * heads * q.shape[2] * k.shape[2] * 4
    dout = torch.randn(batch, heads, q.shape[2], v.shape[3])
    with vitkern.backend("triton"):
        assert large_allocations(lambda: _run(op, tensors, dout), threshold) == []
    with vitkern.backend("eager"):
        assert large_allocations(lambda: _run(op, tensors, dout), threshold) != []


# --- custom ops -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0, 1, 3])
def test_opcheck(mode):
    """No bias, a table (the LeViT biases take the same path through the op) and a dense bias."""
    geometry, bias = [], None
    if mode == 1:
        q, k, v = _qkv(1, 2, 6, 6, 16, 16)
        bias, geometry = torch.randn(15, 2, device=DEVICE, requires_grad=True), [2, 3]
    else:
        q, k, v = _qkv(2, 2, 5, 7, 8, 16)
        if mode == 3:
            bias = torch.randn(1, 2, 5, 7, device=DEVICE, requires_grad=True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.vitkern.attention, (q, k, v, bias, None, mode, geometry, 0.25, "triton"))
    out, lse = kernels.attention_fwd(q.detach(), k.detach(), v.detach(), bias, None, mode, geometry, 0.25)
    args = (
        torch.randn_like(out),
        q.detach(),
        k.detach(),
        v.detach(),
        out,
        lse,
        None if bias is None else bias.detach(),
        None,
        mode,
        geometry,
        0.25,
        bias is not None,
        "triton",
    )
    torch.library.opcheck(torch.ops.vitkern.attention_backward, args)


# --- bad input --------------------------------------------------------------------------------------------------


def _bad_calls():
    q, k, v = _qkv(1, 2, 6, 6, 16, 16)
    table = torch.randn(15, 2)
    biases = torch.randn(2, 16)
    q4, k16, v16 = _qkv(1, 2, 4, 16, 16, 16)
    ops = vitkern.ops
    return [
        (ValueError, "q", lambda: ops.rel_pos_attention(q, k, v, table, (2, 2))),
        (ValueError, "table", lambda: ops.rel_pos_attention(q, k, v, torch.randn(14, 2), (2, 3))),
        (ValueError, "table", lambda: ops.rel_pos_attention(q, k, v, torch.randn(15, 3), (2, 3))),
        (ValueError, "k", lambda: ops.rel_pos_attention(q, k[:, :1], v, table, (2, 3))),
        (TypeError, "table", lambda: ops.rel_pos_attention(q, k, v, table.double(), (2, 3))),
        (TypeError, "k", lambda: ops.rel_pos_attention(q, k.half(), v, table, (2, 3))),
        (ValueError, "table", lambda: ops.rel_pos_attention(q, k, v, table.to("meta"), (2, 3))),
        (ValueError, "q", lambda: ops.rel_pos_attention(q[0], k, v, table, (2, 3))),
        (ValueError, "window", lambda: ops.rel_pos_attention(q, k, v, table, (0, 3))),
        (ValueError, "stride", lambda: ops.levit_attention(q4, k16, v16, biases, 4, stride=0)),
        (ValueError, "q", lambda: ops.levit_attention(q4, k16, v16, biases, 4, stride=1)),
        (ValueError, "biases", lambda: ops.levit_attention(q4, k16, v16, torch.randn(2, 15), 4, stride=2)),
        (ValueError, "biases", lambda: ops.levit_attention(q4, k16, v16, torch.randn(3, 16), 4, stride=2)),
        (ValueError, "bias", lambda: ops.biased_attention(q, k, v, torch.randn(1, 2, 6, 5))),
        (ValueError, "v", lambda: ops.biased_attention(q, k, v[:, :, :5])),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_raises_naming_the_argument(case):
    error, name, call = _bad_calls()[case]
    with vitkern.backend("triton"), pytest.raises(error, match=rf"^{name}:"):
        call()
