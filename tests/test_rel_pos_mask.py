"""The shifted-window ``mask`` of rel_pos_attention (Swin): the Triton kernels and every backend against the
reference, which adds mask[b % num_windows] to batch entry b's scores."""

import pytest
import torch

import vitkern
from vitkern import reference
from vitkern.kernels import attention as kernels

TOL = dict(rtol=1e-4, atol=1e-4)


def swin_mask(num_windows: int, tokens: int, masked: float) -> torch.Tensor:
    """A (num_windows, N, N) 0 / ``masked`` mask of random token groups, as timm's SwinTransformerBlock builds one
    from region labels; window 0 keeps every pair (an unshifted window)."""
    labels = torch.randint(0, 3, (num_windows, tokens))
    labels[0] = 0
    same = labels[:, :, None] == labels[:, None, :]
    return torch.zeros(num_windows, tokens, tokens).masked_fill(~same, masked)


def inputs(batch, heads, window, head_dim, requires_grad=True):
    tokens = window[0] * window[1]
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, requires_grad=requires_grad) for _ in range(3))
    table = (0.5 * torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), heads)).requires_grad_(requires_grad)
    return q, k, v, table


def reference_grads(q, k, v, table, window, mask, dout):
    out = reference.rel_pos_attention(q, k, v, table, window, None, mask)
    return (out, *torch.autograd.grad(out, (q, k, v, table), dout))


@pytest.mark.parametrize("masked", [-100.0, float("-inf")])
@pytest.mark.parametrize(
    "batch,num_windows,window,head_dim", [(4, 2, (3, 3), 8), (6, 3, (4, 5), 16), (2, 1, (2, 2), 4)]
)
def test_triton_kernels_with_mask(batch, num_windows, window, head_dim, masked):
    heads = 2
    q, k, v, table = inputs(batch, heads, window, head_dim)
    mask = swin_mask(num_windows, window[0] * window[1], masked)
    dout = torch.randn(batch, heads, window[0] * window[1], head_dim)
    want = reference_grads(q, k, v, table, window, mask, dout)
    scale = head_dim**-0.5
    with torch.no_grad():
        out, lse = kernels.attention_fwd(q, k, v, table, mask, kernels.BIAS_REL_POS, list(window), scale)
        grads = kernels.attention_bwd(
            dout, q, k, v, out, lse, table, mask, kernels.BIAS_REL_POS, list(window), scale, True
        )
    for name, got, expected in zip(("out", "dq", "dk", "dv", "dtable"), (out, *grads), want):
        torch.testing.assert_close(got, expected, **TOL, msg=name)


def test_triton_mask_fully_masked_rows_give_zeros():
    """A window whose mask is -inf everywhere: zero output and zero gradients, as the reference gives."""
    batch, heads, window, head_dim = 4, 2, (2, 3), 8
    q, k, v, table = inputs(batch, heads, window, head_dim)
    mask = swin_mask(2, 6, float("-inf"))
    mask[1] = float("-inf")
    dout = torch.randn(batch, heads, 6, head_dim)
    want = reference_grads(q, k, v, table, window, mask, dout)
    assert want[0][1::2].abs().max() == 0
    scale = head_dim**-0.5
    with torch.no_grad():
        out, lse = kernels.attention_fwd(q, k, v, table, mask, kernels.BIAS_REL_POS, list(window), scale)
        grads = kernels.attention_bwd(
            dout, q, k, v, out, lse, table, mask, kernels.BIAS_REL_POS, list(window), scale, True
        )
    for name, got, expected in zip(("out", "dq", "dk", "dv", "dtable"), (out, *grads), want):
        torch.testing.assert_close(got, expected, **TOL, msg=name)
    for got in (out, *grads[:3]):
        assert got[1::2].abs().max() == 0


def test_reference_mask_is_added_per_window():
    """The oracle itself against a hand-written loop over batch entries."""
    batch, heads, window = 6, 2, (2, 2)
    q, k, v, table = inputs(batch, heads, window, 4, requires_grad=False)
    mask = swin_mask(3, 4, -100.0)
    got = reference.rel_pos_attention(q, k, v, table, window, None, mask)
    bias = reference.rel_pos_bias(table, window)
    for b in range(batch):
        scores = q[b] @ k[b].transpose(-1, -2) * 4**-0.5 + bias + mask[b % 3]
        torch.testing.assert_close(got[b], scores.softmax(-1) @ v[b], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("masked", [-100.0, float("-inf")])
@pytest.mark.parametrize("backend", ["eager", "auto", "triton", "cuda"])
def test_rel_pos_attention_mask_every_backend(backend, masked):
    batch, heads, window, head_dim = 4, 2, (3, 3), 8
    q, k, v, table = inputs(batch, heads, window, head_dim)
    mask = swin_mask(2, 9, masked)
    dout = torch.randn(batch, heads, 9, head_dim)
    want = reference_grads(q, k, v, table, window, mask, dout)
    mask_before = mask.clone()
    with vitkern.backend(backend):
        out = vitkern.ops.rel_pos_attention(q, k, v, table, window, mask=mask)
    grads = torch.autograd.grad(out, (q, k, v, table), dout)
    for name, got, expected in zip(("out", "dq", "dk", "dv", "dtable"), (out, *grads), want):
        torch.testing.assert_close(got, expected, **TOL, msg=name)
    assert torch.equal(mask, mask_before)


def test_attention_op_with_mask_passes_opcheck():
    q, k, v, table = inputs(4, 2, (2, 3), 16)
    mask = swin_mask(2, 6, -100.0)
    torch.library.opcheck(
        torch.ops.vitkern.attention, (q, k, v, table, mask, kernels.BIAS_REL_POS, [2, 3], 0.25, "triton")
    )


@pytest.mark.parametrize(
    "mask,error,match",
    [
        (torch.zeros(2, 4, 5), ValueError, r"mask: expected shape \(num_windows, 4, 4\)"),
        (torch.zeros(3, 4, 4), ValueError, "mask: expected num_windows dividing the batch 4"),
        (torch.zeros(2, 4, 4, dtype=torch.float64), TypeError, "mask: expected dtype"),
        (torch.zeros(2, 4, 4, dtype=torch.float16), TypeError, "mask: expected dtype torch.float32"),
        (torch.zeros(4, 4), ValueError, "mask: expected a 3-D tensor"),
        (torch.zeros(2, 4, 4, requires_grad=True), ValueError, "mask: expected a tensor that does not require grad"),
    ],
)
def test_rel_pos_attention_bad_mask(mask, error, match):
    q, k, v, table = inputs(4, 2, (2, 2), 8, requires_grad=False)
    with pytest.raises(error, match=match):
        vitkern.ops.rel_pos_attention(q, k, v, table, (2, 2), mask=mask)
