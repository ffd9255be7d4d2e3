"""The short-sequence backward of the Triton attention (``_attention_bwd_short_kernel``: every query in one tile,
P and dS once per key block, dq, dk, dv and the bias gradient's dS from them) against the plain-PyTorch reference.

fp16 under the interpreter (which has no bf16): every bias mode; the table gradient's dS summed over a chunk of
batch entries both ways (in registers where one key block covers the keys, read back per key block where several
do); several chunks; the Swin mask; a dense bias of the full and of a broadcast shape. Also: bitwise deterministic
table gradients, no (B, H, Nq, Nk) allocation, and which calls the kernel takes. Past 64 queries, and for head
blocks of 64, the kernel splits the queries (``SPLIT_Q``: dq and dS per query block, dk and dv from the dk/dv
kernel): the same cases there. The
long-sequence kernels (the dq kernel, the table kernel) are stubbed out in these tests, so a pass is the short
kernel's.
"""

from __future__ import annotations

import pytest
import torch

import vitkern
from vitkern import reference
from vitkern.kernels import attention as kernels
from vitkern.testing import assert_close, large_allocations

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors under the Triton interpreter")


@pytest.fixture(autouse=True)
def short_only(monkeypatch):
    """Fail on any launch of the long-sequence backward."""

    def refuse(*args, **kwargs):
        raise AssertionError("the long-sequence backward ran")

    monkeypatch.setattr(kernels, "_long_bwd", refuse)
    monkeypatch.setattr(kernels, "_table_grad", refuse)


def _grads(op, tensors, dout, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = op(*leaves, **kwargs)
    return out.detach(), torch.autograd.grad(out, leaves, dout)


def _check(op, ref_op, tensors, names, mask=None, **kwargs):
    """fp16 on the Triton kernels within 2x the fp16 reference's error against the fp32 reference (a ``mask`` in
    the dtype of each run)."""
    batch, heads, nq, _ = tensors[0].shape
    dout = torch.randn(batch, heads, nq, tensors[2].shape[-1])
    half = kwargs if mask is None else {**kwargs, "mask": mask.half()}
    full = kwargs if mask is None else {**kwargs, "mask": mask.float()}
    originals = [t.clone() for t in tensors]
    with vitkern.backend("triton"):
        out, grads = _grads(op, tensors, dout.half(), **half)
    for name, tensor, original in zip(names, tensors, originals):
        assert torch.equal(tensor, original), f"{name} was modified in place"
    ref_out, ref_grads = _grads(ref_op, [t.float() for t in tensors], dout, **full)
    same_out, same_grads = _grads(ref_op, tensors, dout.half(), **half)
    assert_close(out, ref_out, same_out, name="out")
    for name, grad, ref_grad, same_grad in zip(names, grads, ref_grads, same_grads):
        assert_close(grad, ref_grad, same_grad, name=f"d{name}")


def _half(*tensors):
    return [t.half() for t in tensors]


REL_POS_CASES = [
    # (batch, heads, window, head dim, target programs): chunks = min(batch, cdiv(target, heads x query blocks))
    (5, 2, (7, 7), 32, 2),  # one chunk of 5 entries, 49 keys in 16-key blocks
    (4, 2, (2, 3), 16, 4),  # two chunks of 2 entries, one 16 x 16 tile: the sum in registers
    (3, 1, (8, 8), 16, 1),  # one chunk of 3 entries, 64 keys in 16-key blocks: read back per block
    (2, 2, (1, 16), 32, 1024),  # one entry per chunk
    (3, 2, (9, 9), 16, 8),  # split queries: two 64-row blocks of 81, two chunks, the sum read back per key block
    (2, 1, (10, 13), 32, 1024),  # split queries: 130 queries in three blocks, three key blocks, one entry per chunk
    (3, 2, (4, 5), 64, 2),  # head dim 64: split queries in 16-row blocks, 16-key blocks
]


@pytest.mark.parametrize("batch, heads, window, d, target", REL_POS_CASES)
def test_rel_pos(monkeypatch, batch, heads, window, d, target):
    monkeypatch.setattr(kernels, "TARGET_PROGRAMS", target)
    tokens = window[0] * window[1]
    q, k, v = (torch.randn(batch, tokens, heads, d).transpose(1, 2) for _ in range(3))
    table = torch.randn(heads, (2 * window[0] - 1) * (2 * window[1] - 1)).t()
    _check(
        vitkern.ops.rel_pos_attention,
        reference.rel_pos_attention,
        _half(q, k, v, table),
        "qkvt",
        window=window,
        scale=0.3,
    )


@pytest.mark.parametrize(
    "resolution, stride, d, dv",
    [
        (7, 1, 16, 32),
        (4, 2, 16, 32),
        (14, 2, 16, 32),
        (7, 2, 32, 16),
        (5, 3, 8, 16),
        (9, 1, 16, 32),
        (15, 2, 16, 16),
        (7, 2, 16, 64),  # LeViT's shrink attention: 64-wide values
        (4, 1, 16, 64),  # 16 tokens, 64-wide values: one 16 x 16 tile, the dS sum in registers
    ],
)
def test_levit(monkeypatch, resolution, stride, d, dv):
    monkeypatch.setattr(kernels, "TARGET_PROGRAMS", 2)
    batch, heads = 3, 2
    res_q = (resolution - 1) // stride + 1
    q = torch.randn(batch, heads, res_q * res_q, d)
    k = torch.randn(batch, heads, resolution * resolution, d)
    v = torch.randn(batch, heads, resolution * resolution, dv)
    biases = torch.randn(heads, resolution * resolution)
    _check(
        vitkern.ops.levit_attention,
        reference.levit_attention,
        _half(q, k, v, biases),
        "qkvb",
        resolution=resolution,
        stride=stride,
    )


@pytest.mark.parametrize(
    "batch, heads, nq, nk, dv, bias_shape",
    [
        (2, 2, 15, 17, 32, None),
        (2, 3, 20, 20, 32, (2, 3, 20, 20)),
        (2, 2, 60, 70, 32, (1, 2, 60, 70)),
        (3, 2, 9, 12, 32, (1, 1, 1, 12)),
        (2, 2, 70, 50, 32, (2, 2, 70, 50)),  # split queries
        (2, 1, 100, 30, 32, (2, 1, 1, 30)),
        (1, 2, 66, 66, 32, None),
        (2, 2, 20, 36, 64, (1, 2, 20, 36)),  # 64-wide values: split queries in 16-row blocks
    ],
)
def test_dense(batch, heads, nq, nk, dv, bias_shape):
    q, k, v = torch.randn(batch, heads, nq, 16), torch.randn(batch, heads, nk, 16), torch.randn(batch, heads, nk, dv)
    if bias_shape is None:
        _check(vitkern.ops.biased_attention, reference.biased_attention, _half(q, k, v), "qkv")
    else:
        bias = torch.randn(bias_shape)
        _check(vitkern.ops.biased_attention, reference.biased_attention, _half(q, k, v, bias), "qkvb")


@pytest.mark.parametrize("masked", [-100.0, float("-inf")])
@pytest.mark.parametrize("window", [(4, 4), (9, 8)])
def test_swin_mask(monkeypatch, masked, window):
    """mask[b % num_windows] added to batch entry b, with a chunk of several entries and windows (9 x 8: split
    queries)."""
    monkeypatch.setattr(kernels, "TARGET_PROGRAMS", 2)
    batch, heads, num_windows = 6, 2, 3
    tokens = window[0] * window[1]
    labels = torch.randint(0, 3, (num_windows, tokens))
    labels[0] = 0
    mask = torch.zeros(num_windows, tokens, tokens).masked_fill(labels[:, :, None] != labels[:, None, :], masked)
    q, k, v = (torch.randn(batch, heads, tokens, 16) for _ in range(3))
    table = torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), heads)
    _check(
        vitkern.ops.rel_pos_attention,
        reference.rel_pos_attention,
        _half(q, k, v, table),
        "qkvt",
        window=window,
        mask=mask,
    )


@pytest.mark.parametrize("mode", ["rel_pos", "rel_pos_split", "levit"])
def test_table_gradient_is_bitwise_deterministic(monkeypatch, mode):
    monkeypatch.setattr(kernels, "TARGET_PROGRAMS", 4)
    if mode.startswith("rel_pos"):
        side = 9 if mode == "rel_pos_split" else 7
        q, k, v = _half(*(torch.randn(5, 2, side * side, 16) for _ in range(3)))
        bias = torch.randn((2 * side - 1) ** 2, 2).half()
        op = lambda *t: vitkern.ops.rel_pos_attention(*t, window=(side, side))  # noqa: E731
    else:
        q, k, v = _half(torch.randn(5, 2, 49, 16), torch.randn(5, 2, 196, 16), torch.randn(5, 2, 196, 32))
        bias = torch.randn(2, 196).half()
        op = lambda *t: vitkern.ops.levit_attention(*t, resolution=14, stride=2)  # noqa: E731
    dout = torch.randn(5, 2, q.shape[2], v.shape[3]).half()
    with vitkern.backend("triton"):
        first = _grads(op, [q, k, v, bias], dout)[1][3]
        second = _grads(op, [q, k, v, bias], dout)[1][3]
    assert torch.equal(first, second)


@pytest.mark.parametrize("window", [(7, 7), (8, 8), (9, 9)])
def test_no_score_matrix_allocation(monkeypatch, window):
    """The dS partials are (chunks, H, Nq, Nk) fp32 with fewer chunks than batch entries (here one of eight): nothing
    of B * H * Nq * Nk fp16 elements or more is allocated, while the reference, which materialises the scores, is
    flagged by the same check."""
    tokens = window[0] * window[1]
    batch, heads = 8, 2
    monkeypatch.setattr(kernels, "SHORT_DS_BYTES", heads * tokens * tokens * 4)
    q, k, v = _half(*(torch.randn(batch, heads, tokens, 16) for _ in range(3)))
    table = torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), heads).half()
    dout = torch.randn(batch, heads, tokens, 16).half()
    threshold = batch * heads * tokens * tokens * 2

    def run():
        return _grads(lambda *t: vitkern.ops.rel_pos_attention(*t, window=window), [q, k, v, table], dout)

    with vitkern.backend("triton"):
        assert large_allocations(run, threshold) == []
    with vitkern.backend("eager"):
        assert large_allocations(run, threshold) != []


def test_pair_index_lists_every_pair_once():
    """Each (query, key) pair sits once under exactly the entry of the reference's index for it."""
    cases = [
        (kernels.BIAS_REL_POS, (3, 5), reference.rel_pos_index((3, 5))),
        (kernels.BIAS_LEVIT, (7, 2), reference.levit_index(7, 2)),
        (kernels.BIAS_LEVIT, (5, 3), reference.levit_index(5, 3)),
    ]
    for mode, geometry, want in cases:
        nq, nk = want.shape
        index = kernels._pair_index(mode, geometry, nq, nk, torch.device("cpu"))
        listed = index >= 0
        pairs = index[listed].long()
        assert torch.equal(pairs.sort().values, torch.arange(nq * nk))
        owner = torch.arange(index.shape[0])[:, None].expand_as(index)[listed]
        assert torch.equal(want.flatten()[pairs], owner)


def test_short_config_takes_only_its_calls():
    assert kernels._short_config(49, 49, 32, 32, torch.float16) is not None
    assert kernels._short_config(64, 256, 32, 32, torch.bfloat16) is not None
    assert kernels._short_config(64, 64, 64, 32, torch.float16)["SPLIT_Q"]
    assert kernels._short_config(64, 64, 128, 32, torch.float16) is None
    assert kernels._short_config(49, 196, 16, 32, torch.float16) is not None
    assert kernels._short_config(49, 49, 32, 32, torch.float32) is None
    assert kernels._short_config(49, 49, 128, 32, torch.float16) is None
    assert kernels._short_config(16, 300, 32, 32, torch.float16) is None
    assert not kernels._short_config(64, 256, 32, 32, torch.float16)["SPLIT_Q"]
    assert kernels._short_config(65, 65, 32, 32, torch.float16)["SPLIT_Q"]
    assert kernels._short_config(256, 256, 32, 32, torch.bfloat16)["SPLIT_Q"]
    assert kernels._short_config(257, 64, 32, 32, torch.float16) is None
    assert kernels._short_config(196, 196, 64, 64, torch.float16)["BLOCK_M"] == 16
    assert kernels._short_config(196, 196, 32, 128, torch.float16) is None


def test_split_queries_take_the_dkdv_kernel_once(monkeypatch):
    """Past 64 queries: one launch of the short kernel with SPLIT_Q over every query block, then dk and dv from the
    dk/dv kernel; up to 64, the short kernel alone."""
    launches = []
    real_dkdv = kernels._dkdv_bwd
    monkeypatch.setattr(kernels, "_dkdv_bwd", lambda *args: launches.append("dkdv") or real_dkdv(*args))
    for tokens, want in ((81, ["dkdv"]), (64, [])):
        launches.clear()
        q, k, v = _half(*(torch.randn(2, 1, tokens, 16) for _ in range(3)))
        with vitkern.backend("triton"):
            _grads(vitkern.ops.biased_attention, [q, k, v], torch.randn(2, 1, tokens, 16).half())
        assert launches == want, tokens


@pytest.mark.parametrize("window, block_m, block_n", [((14, 14), 64, 32), ((6, 11), 16, 64), ((3, 5), 16, 16)])
def test_table_parts_index_the_scaled_table(window, block_m, block_n):
    """The scaled table the kernels read past one key block (``_table_args``): at query part - key part it holds
    log2(e) times the reference's dense bias for every query and key, -inf for the padding keys, and a real entry
    for the padding queries; every index lies inside the table."""
    heads, tokens = 3, window[0] * window[1]
    entries = (2 * window[0] - 1) * (2 * window[1] - 1)
    table = torch.randn(heads, entries).t()  # (entries, heads), not contiguous
    config = {"BLOCK_M": block_m, "BLOCK_N": block_n}
    scaled, query, key, strides = kernels._table_args(table, list(window), tokens, tokens, config)
    assert scaled.shape == (heads, 2 * entries) and strides == (0, 2 * entries, 1, 0)
    assert query.numel() % block_m == 0 and key.numel() % block_n == 0 and query.numel() >= tokens <= key.numel()
    index = query[:, None].long() - key[None, :].long()
    assert ((index >= 0) & (index < 2 * entries)).all()
    gathered = scaled[:, index]
    expected = reference.rel_pos_bias(table, window) * torch.tensor(1.4426950408889634, dtype=torch.float32)
    assert torch.equal(gathered[:, :tokens, :tokens], expected)
    assert torch.isneginf(gathered[:, :, tokens:]).all()
    assert torch.isfinite(gathered[:, tokens:, :tokens]).all()


def test_short_chunks_bound_the_partials_by_heads():
    """CoAtNet-0 stage 3 (64 images, 12 heads, 196 tokens in 4 query blocks): SHORT_DS_BYTES holds 18 chunks of
    (12, 196, 196) fp32 partials, so 16 chunks of 4 images; without a table gradient about TARGET_PROGRAMS
    programs over 12 heads x 4 query blocks: cdiv(1024, 48) = 22 chunks of 3 images."""
    assert kernels.SHORT_DS_BYTES // (12 * 196 * 196 * 4) == 18
    assert kernels._short_chunks(64, 12, 4, 196, 196, True) == (16, 4)
    assert kernels._short_chunks(64, 12, 4, 196, 196, False) == (22, 3)
