"""vitkern.nn.DepthwiseConv2d: an nn.Conv2d drop-in with the same parameters and state_dict."""

import pytest
import torch
import torch.nn as nn

import vitkern
from vitkern.nn import DepthwiseConv2d

BACKENDS = ["eager", "auto", "triton", "cuda"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kernel, stride, padding, dilation",
    [(3, 1, 1, 1), (7, 1, "same", 1), ((5, 3), 2, (2, 1), 1), (3, 1, "valid", 2)],
)
def test_matches_conv2d(backend, kernel, stride, padding, dilation):
    conv = nn.Conv2d(5, 5, kernel, stride, padding, dilation, groups=5)
    fused = DepthwiseConv2d.from_conv2d(conv)
    x = torch.randn(2, 5, 11, 9, requires_grad=True)
    expected = conv(x)
    (gx_ref, gw_ref, gb_ref) = torch.autograd.grad(expected.square().sum(), (x, conv.weight, conv.bias))
    with vitkern.backend(backend):
        out = fused(x)
        gx, gw, gb = torch.autograd.grad(out.square().sum(), (x, fused.weight, fused.bias))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gb, gb_ref, rtol=1e-4, atol=1e-4)


def test_state_dict_is_conv2d_compatible():
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
    fused = DepthwiseConv2d(4, 3, padding=1, bias=False)
    assert isinstance(fused, nn.Conv2d)
    assert set(fused.state_dict()) == set(conv.state_dict())
    fused.load_state_dict(conv.state_dict())
    x = torch.randn(1, 4, 6, 6)
    torch.testing.assert_close(fused(x), conv(x))


@pytest.mark.parametrize(
    "conv, message",
    [
        (nn.Conv2d(4, 8, 3, groups=4), "depthwise"),
        (nn.Conv2d(4, 4, 3, groups=1), "depthwise"),
        (nn.Conv2d(4, 4, 3, groups=4, padding=1, padding_mode="reflect"), "padding_mode"),
    ],
)
def test_from_conv2d_rejects_non_depthwise(conv, message):
    with pytest.raises(ValueError, match=message):
        DepthwiseConv2d.from_conv2d(conv)


def test_from_conv2d_rejects_non_conv():
    with pytest.raises(TypeError, match="conv"):
        DepthwiseConv2d.from_conv2d(nn.Linear(3, 3))
