"""The custom ops ``vitkern::depthwise_conv2d`` and ``vitkern::depthwise_conv2d_backward``: fake implementations,
autograd, and the binding of each kernel family (Triton, CUDA C++, its emulation build) to the kernel contract in
:mod:`vitkern.kernels.contract`.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import torch

from vitkern.kernels.contract import (
    ACTIVATION_CODES,
    DEPTHWISE_CONV2D_BWD_SCHEMA,
    DEPTHWISE_CONV2D_FWD_SCHEMA,
    memory_format,
    output_size,
    with_backend,
)
from vitkern._grad import needs_grad


def depthwise_conv2d(x, weight, bias, stride, pads, dilation, activation, scale, shift, residual, backend: str):
    """Run the checked call on kernel family ``backend`` ("triton", "cuda" or "cuda-emulated") through the custom
    op, so autograd, torch.compile and opcheck see one op; returns y."""
    fmt = memory_format(x)
    save_z = (activation is not None or scale is not None) and needs_grad(x, weight, bias, scale, shift, residual)
    y, _ = torch.ops.vitkern.depthwise_conv2d(
        x.contiguous(memory_format=fmt),
        weight.contiguous(),
        *(None if vec is None else vec.contiguous() for vec in (bias, scale, shift)),
        None if residual is None else residual.contiguous(memory_format=fmt),
        list(stride),
        list(pads),
        list(dilation),
        ACTIVATION_CODES[activation],
        save_z,
        backend,
    )
    return y


def _kernels(backend: str) -> SimpleNamespace:
    """fwd/bwd callables of one kernel family, all with the contract of :mod:`vitkern.kernels.contract`."""
    if backend == "triton":
        module = importlib.import_module("vitkern.kernels.depthwise_conv")
        return SimpleNamespace(fwd=module.depthwise_conv2d_fwd, bwd=module.depthwise_conv2d_bwd)
    namespace = {"cuda": torch.ops.vitkern_cuda, "cuda-emulated": torch.ops.vitkern_emu}[backend]
    return SimpleNamespace(fwd=namespace.depthwise_conv2d_fwd, bwd=namespace.depthwise_conv2d_bwd)


def _empty_like_format(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))


@torch.library.custom_op("vitkern::depthwise_conv2d", mutates_args=(), schema=with_backend(DEPTHWISE_CONV2D_FWD_SCHEMA))
def _depthwise_conv2d_op(
    x, weight, bias, scale, shift, residual, stride, padding, dilation, activation, save_z, backend
):
    return tuple(
        _kernels(backend).fwd(x, weight, bias, scale, shift, residual, stride, padding, dilation, activation, save_z)
    )


@_depthwise_conv2d_op.register_fake
def _(x, weight, bias, scale, shift, residual, stride, padding, dilation, activation, save_z, backend):
    out_h = output_size(x.shape[2], weight.shape[2], stride[0], padding[0], padding[1], dilation[0])
    out_w = output_size(x.shape[3], weight.shape[3], stride[1], padding[2], padding[3], dilation[1])
    shape = (x.shape[0], x.shape[1], out_h, out_w)
    y = _empty_like_format(x, shape)
    z = _empty_like_format(x, shape) if save_z else x.new_empty(0)
    return y, z


@torch.library.custom_op(
    "vitkern::depthwise_conv2d_backward", mutates_args=(), schema=with_backend(DEPTHWISE_CONV2D_BWD_SCHEMA)
)
def _depthwise_conv2d_backward_op(dy, x, weight, z, scale, stride, padding, dilation, activation, output_mask, backend):
    return tuple(_kernels(backend).bwd(dy, x, weight, z, scale, stride, padding, dilation, activation, output_mask))


@_depthwise_conv2d_backward_op.register_fake
def _(dy, x, weight, z, scale, stride, padding, dilation, activation, output_mask, backend):
    channels = x.shape[1]
    shapes = (tuple(x.shape), tuple(weight.shape), (channels,), (channels,), (channels,))
    outs = []
    for needed, shape, like in zip(output_mask, shapes, (x, weight, weight, weight, weight)):
        if not needed:
            outs.append(like.new_empty(0))
        elif like is x:
            outs.append(_empty_like_format(x, shape))
        else:
            outs.append(like.new_empty(shape))
    return tuple(outs)


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, shift, residual, stride, padding, dilation, activation, save_z, backend = inputs
    _, z = output
    ctx.save_for_backward(x, weight, z, scale)
    ctx.conv_args = (stride, padding, dilation, activation)
    ctx.has = (bias is not None, scale is not None, shift is not None, residual is not None)
    ctx.backend = backend


def _backward(ctx, dy, _dz):
    x, weight, z, scale = ctx.saved_tensors
    has_bias, has_scale, has_shift, has_residual = ctx.has
    needs = ctx.needs_input_grad
    output_mask = [needs[0], needs[1], has_bias and needs[2], has_scale and needs[3], has_shift and needs[4]]
    dy = dy.contiguous(memory_format=memory_format(x))
    if any(output_mask):
        dx, dweight, dbias, dscale, dshift = torch.ops.vitkern.depthwise_conv2d_backward(
            dy, x, weight, z, scale, *ctx.conv_args, output_mask, ctx.backend
        )
    else:
        dx = dweight = dbias = dscale = dshift = None
    grads = [dx, dweight, dbias, dscale, dshift]
    grads = [g if needed else None for g, needed in zip(grads, output_mask)]
    dresidual = dy if has_residual and needs[5] else None
    return (*grads, dresidual, None, None, None, None, None, None)


_depthwise_conv2d_op.register_autograd(_backward, setup_context=_setup_context)
