"""The CPU path of :func:`vitkern.ops.depthwise_conv2d` (``auto`` on CPU tensors): F.conv2d in the faster memory
format for the problem, then the epilogue in plain PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vitkern import _tuning, reference
from vitkern.kernels.contract import memory_format
from vitkern._grad import needs_grad

# Without a measured choice (small problems, deterministic mode, torch.compile; see vitkern._tuning) the CPU path
# converts an NCHW input to channels_last from this kernel width on, where torch's NCHW depthwise kernel on CPU is
# much slower than the channels_last one (benchmarks/cpu_paired.py measures both).
NCHW_SLOW_KERNEL_WIDTH = 15


def depthwise_conv2d(x, weight, bias, stride, pads, dilation, out_size, activation, scale, shift, residual):
    """The ``auto`` path on CPU tensors, on arguments the op has checked: F.conv2d, then the plain epilogue on the
    fresh output (never on an input).

    The convolution runs in whichever memory format is faster for this problem, forward and backward chosen apart
    (vitkern._tuning measures both formats once per signature); the output keeps x's format. Without gradients the
    epilogue runs in place on the convolution's output.
    """
    fmt = memory_format(x)
    top, bottom, left, right = pads
    if top != bottom or left != right:
        x = F.pad(x, (left, right, top, bottom))
        top = left = 0
    conv = _CPUConv(x, weight, bias, stride, (top, left), dilation, out_size, fmt)
    if not needs_grad(x, weight, bias, scale, shift, residual):
        return _epilogue_in_place(conv.run(conv.forward_format(backward=False)), activation, scale, shift, residual)
    forward_fmt = conv.forward_format(backward=True)
    backward_fmt = conv.backward_format(forward_fmt)
    if backward_fmt == forward_fmt:
        z = conv.run(forward_fmt)
    else:
        z = _ConvWithBackwardFormat.apply(x, weight, bias, conv.geometry(), forward_fmt, backward_fmt)
    return reference.depthwise_conv2d_epilogue(z, activation, scale, shift, residual)


_FORMAT_NAMES = {torch.contiguous_format: "nchw", torch.channels_last: "channels_last"}
_FORMATS = {name: fmt for fmt, name in _FORMAT_NAMES.items()}


class _CPUConv:
    """One depthwise F.conv2d problem on CPU (symmetric padding) whose forward or backward runs in a chosen memory
    format; tensors go in and come out in x's own format."""

    def __init__(self, x, weight, bias, stride, padding, dilation, out_size, fmt):
        self.x, self.weight, self.bias = x, weight, bias
        self.stride, self.padding, self.dilation, self.out_size, self.fmt = stride, padding, dilation, out_size, fmt

    def geometry(self):
        """Everything but the tensors, to rebuild the problem on other tensors of the same shape."""
        return self.stride, self.padding, self.dilation, self.out_size, self.fmt

    def run(self, conv_fmt):
        """conv(x) + bias, computed in ``conv_fmt``, returned in x's format."""
        x = self.x
        z = F.conv2d(
            x.contiguous(memory_format=conv_fmt),
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            x.shape[1],
        )
        return z.contiguous(memory_format=self.fmt)

    def run_backward(self, conv_fmt, dz, output_mask):
        """(dx, dweight, dbias) of ``run`` for the output gradient dz, computed in ``conv_fmt``; dx in x's format."""
        x = self.x
        dx, dweight, dbias = torch.ops.aten.convolution_backward(
            dz.contiguous(memory_format=conv_fmt),
            x.contiguous(memory_format=conv_fmt),
            self.weight,
            [x.shape[1]] if output_mask[2] else None,
            list(self.stride),
            list(self.padding),
            list(self.dilation),
            False,
            [0, 0],
            x.shape[1],
            list(output_mask),
        )
        if dx is not None:
            dx = dx.contiguous(memory_format=self.fmt)
        return dx, dweight, dbias

    def _tuning_key(self, direction, backward=True):
        """The measured choice's key, or None where the problem keeps the default (see vitkern._tuning)."""
        batch, channels = self.x.shape[:2]
        kh, kw = self.weight.shape[2:]
        macs = batch * channels * self.out_size[0] * self.out_size[1] * kh * kw
        if not _tuning.worth_tuning(macs, backward, self.x.dtype):
            return None
        return (
            "depthwise_conv2d",
            direction,
            tuple(self.x.shape),
            (kh, kw),
            self.stride,
            self.padding,
            self.dilation,
            self.x.dtype,
            self.fmt,
            self.bias is not None,
            torch.get_num_threads(),
        )

    def forward_format(self, backward):
        default = self.fmt
        if default == torch.contiguous_format and self.weight.shape[3] >= NCHW_SLOW_KERNEL_WIDTH:
            default = torch.channels_last
        key = self._tuning_key("forward", backward)
        if key is None:
            return default

        def candidates():
            return {name: (lambda f=f: self.run(f)) for name, f in _FORMATS.items()}

        return _FORMATS[_tuning.choose(key, candidates, _FORMAT_NAMES[default])]

    def backward_format(self, forward_fmt):
        key = self._tuning_key("backward")
        if key is None:
            return forward_fmt

        def candidates():
            dz = self.x.new_ones((*self.x.shape[:2], *self.out_size)).contiguous(memory_format=self.fmt)
            mask = (True, True, self.bias is not None)
            return {name: (lambda f=f: self.run_backward(f, dz, mask)) for name, f in _FORMATS.items()}

        return _FORMATS[_tuning.choose(key, candidates, _FORMAT_NAMES[forward_fmt])]


class _ConvWithBackwardFormat(torch.autograd.Function):
    """conv(x) + bias with its forward and its backward run in different memory formats. The backward is made of
    differentiable ops, so double backward and torch.func's grad transforms work as through F.conv2d."""

    @staticmethod
    def forward(x, weight, bias, geometry, forward_fmt, backward_fmt):
        return _CPUConv(x, weight, bias, *geometry).run(forward_fmt)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, geometry, _, backward_fmt = inputs
        ctx.save_for_backward(x, weight)
        ctx.geometry, ctx.backward_fmt = geometry, backward_fmt

    @staticmethod
    def backward(ctx, dz):
        x, weight = ctx.saved_tensors
        conv = _CPUConv(x, weight, None, *ctx.geometry)
        dx, dweight, dbias = conv.run_backward(ctx.backward_fmt, dz, ctx.needs_input_grad[:3])
        return dx, dweight, dbias, None, None, None


def _epilogue_in_place(z, activation, scale, shift, residual):
    """``act(z) * scale + shift + residual`` written over z, a fresh tensor no caller holds."""
    if activation == "gelu":
        torch.ops.aten.gelu_(z)
    elif activation == "relu":
        z.relu_()
    if scale is not None:
        z.mul_(scale.view(1, -1, 1, 1))
    if shift is not None:
        z.add_(shift.view(1, -1, 1, 1))
    if residual is not None:
        z.add_(residual)
    return z
