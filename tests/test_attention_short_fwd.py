"""The short-sequence forward of the Triton attention (``_attention_fwd_short_kernel``: a query block of one head
over a chunk of batch entries, the window geometry compile-time) against plain-PyTorch math.

fp16 under the interpreter (which has no bf16): every bias mode; one key block (a one-pass softmax, a table bias
gathered once per program) and several (the streamed softmax, 32-key blocks); 16- and 64-row query blocks; chunks
of one and of several batch entries; the Swin mask across windows, with one key block and with several; a query
row with every score -inf. out is checked within 2x the fp16 reference's error, lse against logsumexp of the fp32
scores of the same fp16 inputs. The long-sequence forward is stubbed out, so a pass is the short kernel's.
"""

from __future__ import annotations

import pytest
import torch

from vitkern import reference
from vitkern.kernels import attention as kernels
from vitkern.testing import assert_close

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors under the Triton interpreter")


_LONG_FORWARD = kernels._attention_fwd_kernel


class _Refused:
    def __getitem__(self, grid):
        raise AssertionError("the long-sequence forward ran")


@pytest.fixture(autouse=True)
def short_only(monkeypatch):
    monkeypatch.setattr(kernels, "_attention_fwd_kernel", _Refused())


def _expected(q, k, v, dense_bias, scale):
    """(out, lse) of softmax(scale * q @ k^T + dense_bias) @ v by plain PyTorch in q's dtype and in fp32."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale + dense_bias.float()
    lse = torch.logsumexp(scores, -1)
    out = reference.biased_attention(q.float(), k.float(), v.float(), dense_bias.float(), scale)
    same = reference.biased_attention(q, k, v, dense_bias.to(q.dtype), scale)
    return out, same, lse


def _check(q, k, v, bias, mask, mode, geometry, dense_bias, scale=0.25):
    originals = [t.clone() for t in (q, k, v)]
    out, lse = kernels.attention_fwd(q, k, v, bias, mask, mode, geometry, scale)
    for name, tensor, original in zip("qkv", (q, k, v), originals):
        assert torch.equal(tensor, original), f"{name} was modified in place"
    ref_out, same_out, ref_lse = _expected(q, k, v, dense_bias, scale)
    assert_close(out, ref_out, same_out, name="out")
    torch.testing.assert_close(lse, ref_lse, rtol=1e-3, atol=1e-3)


def _half(*shape):
    return torch.randn(*shape).half()


@pytest.mark.parametrize(
    "batch, heads, window, d, target",
    [
        (5, 2, (7, 7), 32, 2),  # one chunk of 5 entries, 49 keys in one block: the table gathered once
        (3, 2, (14, 14), 32, 8),  # 196 tokens: 4 query blocks, key blocks streamed, one chunk of 3
        (4, 1, (2, 3), 16, 1024),  # 6 tokens in a 16 x 16 tile, one entry per chunk
        (3, 2, (8, 8), 16, 2),  # 64 keys in one block
        (2, 2, (9, 9), 64, 4),  # head dim 64, 81 keys streamed
        (3, 2, (6, 12), 32, 2),  # a 6 x 12 window: 72 keys streamed, the table's rows and columns differ
    ],
)
def test_rel_pos(monkeypatch, batch, heads, window, d, target):
    monkeypatch.setattr(kernels, "TARGET_PROGRAMS", target)
    tokens = window[0] * window[1]
    q, k, v = (_half(batch, tokens, heads, d).transpose(1, 2) for _ in range(3))
    table = _half(heads, (2 * window[0] - 1) * (2 * window[1] - 1)).t()
    dense = reference.rel_pos_bias(table.float(), window).unsqueeze(0)
    _check(q, k, v, table, None, kernels.BIAS_REL_POS, list(window), dense)


@pytest.mark.parametrize(
    "resolution, stride, d, dv", [(7, 1, 16, 32), (4, 2, 16, 32), (14, 2, 16, 32), (9, 1, 32, 32), (10, 2, 16, 64)]
)
def test_levit(monkeypatch, resolution, stride, d, dv):
    monkeypatch.setattr(kernels, "TARGET_PROGRAMS", 2)
    batch, heads = 3, 2
    res_q = (resolution - 1) // stride + 1
    q = _half(batch, heads, res_q * res_q, d)
    k, v = _half(batch, heads, resolution * resolution, d), _half(batch, heads, resolution * resolution, dv)
    biases = _half(heads, resolution * resolution)
    dense = reference.levit_bias(biases.float(), resolution, stride).unsqueeze(0)
    _check(q, k, v, biases, None, kernels.BIAS_LEVIT, [resolution, stride], dense)


@pytest.mark.parametrize(
    "nq, nk, bias_shape",
    [(15, 17, None), (20, 20, (3, 2, 20, 20)), (60, 70, (1, 2, 60, 70)), (9, 12, (1, 1, 1, 12))],
)
def test_dense_and_none(monkeypatch, nq, nk, bias_shape):
    monkeypatch.setattr(kernels, "TARGET_PROGRAMS", 2)
    batch, heads = 3, 2
    q, k, v = _half(batch, heads, nq, 16), _half(batch, heads, nk, 16), _half(batch, heads, nk, 32)
    if bias_shape is None:
        _check(q, k, v, None, None, 0, [], torch.zeros(1, 1, nq, nk))
    else:
        bias = _half(*bias_shape)
        _check(q, k, v, bias, None, kernels.BIAS_DENSE, [], bias.float())


@pytest.mark.parametrize("masked", [-100.0, float("-inf")])
@pytest.mark.parametrize("window", [(4, 4), (9, 9)])
def test_swin_mask(monkeypatch, masked, window):
    """mask[b % num_windows] added to batch entry b, a chunk spanning several windows, the table gathered once
    (4 x 4) or per key block beside the streamed keys (9 x 9)."""
    monkeypatch.setattr(kernels, "TARGET_PROGRAMS", 2)
    batch, heads, num_windows = 6, 2, 3
    tokens = window[0] * window[1]
    labels = torch.randint(0, 3, (num_windows, tokens))
    labels[0] = 0
    mask = torch.zeros(num_windows, tokens, tokens).masked_fill(labels[:, :, None] != labels[:, None, :], masked)
    q, k, v = (_half(batch, heads, tokens, 16) for _ in range(3))
    table = _half((2 * window[0] - 1) * (2 * window[1] - 1), heads)
    table_bias = reference.rel_pos_bias(table.float(), window).unsqueeze(0)
    dense = table_bias + reference.attention.window_mask_bias(mask, batch)
    _check(q, k, v, table, mask.half(), kernels.BIAS_REL_POS, list(window), dense)


@pytest.mark.parametrize("nk", [40, 100])
def test_row_with_every_score_masked(nk):
    """A query row whose every score is -inf gives out = 0 and lse = -inf (the kernels' contract); the other rows
    are the softmax's, with one key block and with several."""
    batch, heads, nq = 2, 2, 20
    q, k, v = _half(batch, heads, nq, 16), _half(batch, heads, nk, 16), _half(batch, heads, nk, 16)
    bias = torch.zeros(batch, heads, nq, nk)
    bias[1, 0, 3] = float("-inf")
    out, lse = kernels.attention_fwd(q, k, v, bias.half(), None, kernels.BIAS_DENSE, [], 0.25)
    assert torch.equal(out[1, 0, 3], torch.zeros(16, dtype=torch.float16))
    assert lse[1, 0, 3].item() == float("-inf")
    keep = torch.ones(batch, heads, nq, dtype=torch.bool)
    keep[1, 0, 3] = False
    ref_out, same_out, ref_lse = _expected(q, k, v, bias, 0.25)
    assert_close(out[keep], ref_out[keep], same_out[keep], name="out")
    torch.testing.assert_close(lse[keep], ref_lse[keep], rtol=1e-3, atol=1e-3)


def test_what_the_short_forward_leaves_to_the_long_one(monkeypatch):
    """Head dims that are not multiples of 16, more than 256 keys and a mask beside 64-wide heads past 64 keys take
    the long-sequence forward."""
    long_calls = []

    class _Counted:
        def __getitem__(self, grid):
            long_calls.append(grid)
            return _LONG_FORWARD[grid]

    monkeypatch.setattr(kernels, "_attention_fwd_kernel", _Counted())
    monkeypatch.setattr(kernels, "_attention_fwd_short_kernel", _Refused())
    q, k, v = _half(2, 2, 25, 8), _half(2, 2, 25, 8), _half(2, 2, 25, 8)
    _check(q, k, v, None, None, 0, [], torch.zeros(1, 1, 25, 25))
    q, k, v = _half(1, 1, 20, 16), _half(1, 1, 260, 16), _half(1, 1, 260, 16)
    _check(q, k, v, None, None, 0, [], torch.zeros(1, 1, 20, 260))
    window = (9, 9)
    mask = torch.zeros(1, 81, 81)
    mask[0, :40, 40:] = -100.0
    q, k, v = (_half(2, 1, 81, 64) for _ in range(3))
    table = _half(17 * 17, 1)
    dense = reference.rel_pos_bias(table.float(), window).unsqueeze(0) + mask
    _check(q, k, v, table, mask.half(), kernels.BIAS_REL_POS, list(window), dense)
    assert len(long_calls) == 3


def test_short_forward_config_takes_only_its_calls():
    assert kernels._fwd_short_config(49, 49, 32, 32, torch.float16) == {
        "BLOCK_M": 64,
        "BLOCK_N": 64,
        "BLOCK_D": 32,
        "BLOCK_DV": 32,
        "num_warps": 4,
    }
    assert kernels._fwd_short_config(16, 16, 16, 32, torch.bfloat16)["BLOCK_M"] == 16
    streamed = kernels._fwd_short_config(196, 196, 32, 32, torch.float16)
    assert (streamed["BLOCK_N"], streamed["num_warps"]) == (32, 4)
    assert kernels._fwd_short_config(49, 49, 32, 32, torch.float16, kernels.BIAS_REL_POS, True)["num_warps"] == 8
    assert kernels._fwd_short_config(81, 81, 32, 32, torch.float16, kernels.BIAS_REL_POS, True)["BLOCK_N"] == 32
    assert kernels._fwd_short_config(49, 49, 64, 64, torch.float16)["BLOCK_D"] == 64
    assert kernels._fwd_short_config(81, 81, 64, 64, torch.float16, kernels.BIAS_REL_POS, True) is None
    assert kernels._fwd_short_config(49, 49, 32, 32, torch.float32) is None
    assert kernels._fwd_short_config(49, 257, 32, 32, torch.float16) is None
    assert kernels._fwd_short_config(49, 49, 128, 32, torch.float16) is None
