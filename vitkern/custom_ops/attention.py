"""The custom ops ``vitkern::attention`` and ``vitkern::attention_backward``: fake implementations, autograd, and
the binding of each kernel family to the attention kernel contract in :mod:`vitkern.kernels.contract`.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import torch

from vitkern.kernels.contract import ATTENTION_BWD_SCHEMA, ATTENTION_FWD_SCHEMA, with_backend


def attention(q, k, v, bias, bias_mode, geometry, scale, backend: str, mask=None):
    """Run the checked call on kernel family ``backend`` through the custom op; returns out."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, _ = torch.ops.vitkern.attention(q, k, v, bias, mask, bias_mode, geometry, scale, backend)
    return out


def _kernels(backend: str) -> SimpleNamespace:
    """fwd/bwd callables of one kernel family ("triton", "cuda" or "cuda-emulated"), with the contract of
    :mod:`vitkern.kernels.contract`."""
    if backend == "triton":
        module = importlib.import_module("vitkern.kernels.attention")
        return SimpleNamespace(fwd=module.attention_fwd, bwd=module.attention_bwd)
    namespace = {"cuda": torch.ops.vitkern_cuda, "cuda-emulated": torch.ops.vitkern_emu}[backend]
    return SimpleNamespace(fwd=namespace.attention_fwd, bwd=namespace.attention_bwd)


@torch.library.custom_op("vitkern::attention", mutates_args=(), schema=with_backend(ATTENTION_FWD_SCHEMA))
def _attention_op(q, k, v, bias, mask, bias_mode, geometry, scale, backend):
    return tuple(_kernels(backend).fwd(q, k, v, bias, mask, bias_mode, geometry, scale))


@_attention_op.register_fake
def _(q, k, v, bias, mask, bias_mode, geometry, scale, backend):
    batch, heads, queries, _ = q.shape
    out = q.new_empty((batch, heads, queries, v.shape[3]))
    lse = q.new_empty((batch, heads, queries), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("vitkern::attention_backward", mutates_args=(), schema=with_backend(ATTENTION_BWD_SCHEMA))
def _attention_backward_op(dout, q, k, v, out, lse, bias, mask, bias_mode, geometry, scale, bias_grad, backend):
    return tuple(_kernels(backend).bwd(dout, q, k, v, out, lse, bias, mask, bias_mode, geometry, scale, bias_grad))


@_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, bias, mask, bias_mode, geometry, scale, bias_grad, backend):
    dbias = bias.new_empty(bias.shape) if bias_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


def _setup_context(ctx, inputs, output):
    q, k, v, bias, mask, bias_mode, geometry, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, mask)
    ctx.args = (bias_mode, geometry, scale)
    ctx.backend = backend


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, bias, mask = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = torch.ops.vitkern.attention_backward(
        dout.contiguous(), q, k, v, out, lse, bias, mask, *ctx.args, bias_grad, ctx.backend
    )
    return dq, dk, dv, dbias if bias_grad else None, None, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)
