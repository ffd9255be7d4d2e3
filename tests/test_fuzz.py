"""Property-based tests of every public op: hypothesis draws inputs, every available backend is checked.

Valid inputs: each backend's output and every gradient against the plain-PyTorch reference (vitkern.reference) run
in float64, with the tolerances of vitkern.testing (fp32 1e-4; fp16 at most 2x the fp16 reference's error plus a
small atol). Invalid inputs: the op raises ValueError or TypeError whose message names the argument, on every
backend, and leaves its inputs as they were.

Backends: ``auto`` (the CPU path), ``cuda`` (the CUDA C++ kernels through the emulation build) and ``triton`` (the
interpreter, a few tiny examples). Example counts come from the hypothesis profile (the root conftest.py): ``ci`` by
default, ``--hypothesis-profile=long`` for many more. A failure hypothesis finds becomes a plain test at the end of
this file.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vitkern
from vitkern import reference
from vitkern.ops.depthwise_conv import MAX_KERNEL
from vitkern.testing import assert_close, require_build

AVAILABLE = vitkern.available_backends()
NEEDS_TRITON = pytest.mark.skipif(not AVAILABLE["triton"], reason="needs triton with a GPU or TRITON_INTERPRET=1")
DTYPES = (torch.float32, torch.float16)
# Fractions of the profile's example count: the Triton interpreter and the emulated CUDA threads are slow.
SHARE = {"auto": 1.0, "cuda": 0.5, "triton": 0.1}


def examples(backend: str) -> settings:
    """The loaded profile's settings with the example count scaled for ``backend``."""
    return settings(max_examples=max(2, math.ceil(settings().max_examples * SHARE[backend])))


def snapshot(tensors: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in tensors.items() if t is not None}


def assert_unchanged(tensors: dict[str, torch.Tensor | None], before: dict[str, torch.Tensor]) -> None:
    for name, copy in before.items():
        assert torch.equal(tensors[name].detach(), copy), f"{name} was modified in place"


def run_with_grads(fn, tensors: dict[str, torch.Tensor | None], grad_out_seed: int):
    """fn(**tensors) and the gradient of every tensor input for a fixed random output gradient."""
    leaves = {name: t.detach().requires_grad_() if t is not None else None for name, t in tensors.items()}
    out = fn(**leaves)
    generator = torch.Generator().manual_seed(grad_out_seed)
    dout = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.dtype)
    present = [name for name, t in leaves.items() if t is not None]
    grads = torch.autograd.grad(out, [leaves[name] for name in present], dout)
    return out.detach(), dict(zip(present, grads))


def compare(backend: str, op, ref_op, tensors: dict[str, torch.Tensor | None], seed: int) -> None:
    """op on ``backend`` against ref_op in float64 (and, for fp16, ref_op in fp16 for the error bound)."""
    before = snapshot(tensors)
    with vitkern.backend(backend):
        out, grads = run_with_grads(op, tensors, seed)
    assert_unchanged(tensors, before)
    as64 = {name: None if t is None else t.detach().double() for name, t in tensors.items()}
    ref_out, ref_grads = run_with_grads(ref_op, as64, seed)
    same = None
    dtype = out.dtype
    if dtype != torch.float32:
        same_out, same_grads = run_with_grads(ref_op, tensors, seed)
        same = {"output": same_out, **same_grads}
    assert_close(out, ref_out.float(), None if same is None else same["output"], name=f"{backend} output")
    for name, grad in grads.items():
        ref_grad = ref_grads[name].float()
        assert_close(grad, ref_grad, None if same is None else same[name], name=f"{backend} d{name}")


def values(draw, shape, dtype, layout="contiguous"):
    """A random tensor of ``shape`` in ``dtype``, laid out as ``layout``: "contiguous", "channels_last" (4-D) or
    "strided" (a view that steps over every other element of its last dim)."""
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    if layout == "strided":
        big = torch.randn((*shape[:-1], 2 * shape[-1]), generator=generator).to(dtype)
        return big[..., ::2]
    t = torch.randn(shape, generator=generator).to(dtype)
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    return t


# --- depthwise_conv2d -------------------------------------------------------------------------------------------


def _int_or_pair(draw, low, high):
    a, b = draw(st.integers(low, high)), draw(st.integers(low, high))
    return draw(st.sampled_from([a, (a, b), [a, b]]))


def _as_pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


@st.composite
def conv_inputs(draw, max_kernel: int, max_extent: int, dtypes=DTYPES):
    """A valid depthwise_conv2d call: (tensors, keyword arguments)."""
    dtype = draw(st.sampled_from(dtypes))
    batch, channels = draw(st.integers(1, 2)), draw(st.integers(1, 5))
    square = draw(st.booleans())
    kh = draw(st.integers(1, max_kernel))
    kw = kh if square else draw(st.integers(1, max_kernel))
    stride = _int_or_pair(draw, 1, 3)
    dilation = draw(st.sampled_from([1, _int_or_pair(draw, 1, 3)]))
    padding = draw(st.sampled_from(["same", "valid", "int", "pair"]))
    dh, dw = _as_pair(dilation)
    if padding == "int":
        padding = draw(st.integers(0, (max(kh, kw) + 1) // 2))
    elif padding == "pair":
        padding = draw(st.sampled_from([tuple, list]))(
            (draw(st.integers(0, (kh + 1) // 2)), draw(st.integers(0, (kw + 1) // 2)))
        )
    ph, pw = (0, 0) if isinstance(padding, str) else _as_pair(padding)
    # the smallest input whose output is not empty: the dilated kernel minus the padding, 1 for "same"
    min_h = 1 if padding == "same" else max(1, dh * (kh - 1) + 1 - 2 * ph)
    min_w = 1 if padding == "same" else max(1, dw * (kw - 1) + 1 - 2 * pw)
    height = draw(st.integers(min_h, max(min_h, max_extent)))
    width = draw(st.integers(min_w, max(min_w, max_extent)))
    layout = draw(st.sampled_from(["contiguous", "channels_last", "strided"]))
    x = values(draw, (batch, channels, height, width), dtype, layout)
    tensors = {"x": x, "weight": values(draw, (channels, 1, kh, kw), dtype) * 0.3}
    for name in ("bias", "scale", "shift"):
        tensors[name] = values(draw, (channels,), dtype) if draw(st.booleans()) else None
    kwargs = {
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "activation": draw(st.sampled_from([None, "gelu", "relu"])),
    }
    if draw(st.booleans()):
        out_size = _output_size(x, kh, kw, stride, padding, dilation)
        tensors["residual"] = values(draw, (batch, channels, *out_size), dtype, layout)
    else:
        tensors["residual"] = None
    return tensors, kwargs


def _output_size(x, kh, kw, stride, padding, dilation):
    pads = reference.depthwise_conv.resolve_padding(padding, (kh, kw), _as_pair(dilation))
    sh, sw = _as_pair(stride)
    dh, dw = _as_pair(dilation)
    out_h = (x.shape[2] + pads[0] + pads[1] - dh * (kh - 1) - 1) // sh + 1
    out_w = (x.shape[3] + pads[2] + pads[3] - dw * (kw - 1) - 1) // sw + 1
    return out_h, out_w


def check_conv(backend: str, case) -> None:
    tensors, kwargs = case
    compare(
        backend,
        lambda **t: vitkern.ops.depthwise_conv2d(**t, **kwargs),
        lambda **t: reference.depthwise_conv2d(**t, **kwargs),
        tensors,
        seed=0,
    )


@given(case=conv_inputs(max_kernel=MAX_KERNEL, max_extent=12))
@examples("auto")
def test_depthwise_conv2d_auto(case):
    check_conv("auto", case)


@given(case=conv_inputs(max_kernel=15, max_extent=10))
@examples("cuda")
def test_depthwise_conv2d_cuda_emulated(case):
    require_build(AVAILABLE["cuda-emulated"], "needs the emulation build vitkern._emulation: VITKERN_BUILD_EMULATION=1")
    check_conv("cuda", case)


@NEEDS_TRITON
@given(case=conv_inputs(max_kernel=5, max_extent=6, dtypes=(torch.float32,)))
@examples("triton")
def test_depthwise_conv2d_triton(case):
    check_conv("triton", case)


# --- attention ----------------------------------------------------------------------------------------------------


def _qkv(draw, batch, heads, queries, keys, dtype):
    """q, k, v in one of three layouts: contiguous, (B, N, heads, D) transposed to (B, heads, N, D) as timm's
    attention blocks produce them, or a strided view."""
    head_dim, value_dim = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))

    def one(tokens, dim):
        if layout == "transposed":
            return values(draw, (batch, tokens, heads, dim), dtype).transpose(1, 2)
        return values(draw, (batch, heads, tokens, dim), dtype, layout)

    return one(queries, head_dim), one(keys, head_dim), one(keys, value_dim)


def _scale(draw):
    return draw(st.one_of(st.none(), st.floats(0.05, 2.0)))


def _table(draw, rows, heads, dtype):
    """A bias table (rows, heads), or the transposed view of a (heads, rows) one (vit-pytorch's Embedding)."""
    if draw(st.booleans()):
        return values(draw, (heads, rows), dtype).t()
    return values(draw, (rows, heads), dtype)


@st.composite
def rel_pos_inputs(draw, max_window: int, dtypes=DTYPES):
    dtype = draw(st.sampled_from(dtypes))
    batch, heads = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    wh, ww = draw(st.integers(1, max_window)), draw(st.integers(1, max_window))
    q, k, v = _qkv(draw, batch, heads, wh * ww, wh * ww, dtype)
    table = _table(draw, (2 * wh - 1) * (2 * ww - 1), heads, dtype)
    window = draw(st.sampled_from([(wh, ww), [wh, ww]])) if wh != ww else draw(st.sampled_from([wh, (wh, wh)]))
    return {"q": q, "k": k, "v": v, "table": table}, {"window": window, "scale": _scale(draw)}


@st.composite
def levit_inputs(draw, max_resolution: int, dtypes=DTYPES):
    dtype = draw(st.sampled_from(dtypes))
    batch, heads = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    resolution, stride = draw(st.integers(1, max_resolution)), draw(st.integers(1, 3))
    queries = ((resolution - 1) // stride + 1) ** 2
    q, k, v = _qkv(draw, batch, heads, queries, resolution * resolution, dtype)
    biases = _table(draw, resolution * resolution, heads, dtype).t()
    return (
        {"q": q, "k": k, "v": v, "biases": biases},
        {"resolution": resolution, "stride": stride, "scale": _scale(draw)},
    )


@st.composite
def biased_inputs(draw, max_tokens: int, dtypes=DTYPES):
    dtype = draw(st.sampled_from(dtypes))
    batch, heads = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    queries, keys = draw(st.integers(1, max_tokens)), draw(st.integers(1, max_tokens))
    q, k, v = _qkv(draw, batch, heads, queries, keys, dtype)
    bias = None
    if draw(st.booleans()):
        full = (batch, heads, queries, keys)
        shape = tuple(draw(st.sampled_from([1, size])) for size in full)
        bias = values(draw, shape[draw(st.integers(0, 2)) :], dtype)  # 4-D, or fewer dims broadcast from the right
    return {"q": q, "k": k, "v": v, "bias": bias}, {"scale": _scale(draw)}


ATTENTION = {
    "rel_pos_attention": (vitkern.ops.rel_pos_attention, reference.rel_pos_attention),
    "levit_attention": (vitkern.ops.levit_attention, reference.levit_attention),
    "biased_attention": (vitkern.ops.biased_attention, reference.biased_attention),
}


def check_attention(op_name: str, backend: str, case) -> None:
    tensors, kwargs = case
    op, ref = ATTENTION[op_name]
    if op_name == "rel_pos_attention":
        window = _as_pair(kwargs["window"])
        expected = lambda **t: ref(**t, window=window, scale=kwargs["scale"])  # noqa: E731
        compare(backend, lambda **t: op(**t, **kwargs), expected, tensors, 1)
    else:
        compare(backend, lambda **t: op(**t, **kwargs), lambda **t: ref(**t, **kwargs), tensors, 1)


@given(case=rel_pos_inputs(max_window=6))
@examples("auto")
def test_rel_pos_attention_auto(case):
    check_attention("rel_pos_attention", "auto", case)


@given(case=levit_inputs(max_resolution=7))
@examples("auto")
def test_levit_attention_auto(case):
    check_attention("levit_attention", "auto", case)


@given(case=biased_inputs(max_tokens=24))
@examples("auto")
def test_biased_attention_auto(case):
    check_attention("biased_attention", "auto", case)


@NEEDS_TRITON
@given(case=rel_pos_inputs(max_window=3, dtypes=(torch.float32,)))
@examples("triton")
def test_rel_pos_attention_triton(case):
    check_attention("rel_pos_attention", "triton", case)


@NEEDS_TRITON
@given(case=levit_inputs(max_resolution=4, dtypes=(torch.float32,)))
@examples("triton")
def test_levit_attention_triton(case):
    check_attention("levit_attention", "triton", case)


@NEEDS_TRITON
@given(case=biased_inputs(max_tokens=9, dtypes=(torch.float32,)))
@examples("triton")
def test_biased_attention_triton(case):
    check_attention("biased_attention", "triton", case)


# --- invalid inputs -----------------------------------------------------------------------------------------------


def _tensor_breakage(draw, t: torch.Tensor) -> torch.Tensor | object:
    """``t`` made wrong in one way: rank, dtype, device, or not a tensor at all."""
    kind = draw(st.sampled_from(["rank_up", "rank_down", "float64", "int", "meta", "list"]))
    if kind == "rank_up":
        return t.unsqueeze(0)
    if kind == "rank_down":
        return t.reshape(-1) if t.dim() != 1 else t.reshape(1, -1)
    if kind == "float64":
        return t.double()
    if kind == "int":
        return t.to(torch.int32)
    if kind == "meta":
        return torch.empty(t.shape, dtype=t.dtype, device="meta")
    return t.tolist()


@st.composite
def bad_conv_calls(draw):
    """(tensors, kwargs, the argument the error must name) for a depthwise_conv2d call with one thing wrong."""
    tensors, kwargs = draw(conv_inputs(max_kernel=7, max_extent=8, dtypes=(torch.float32,)))
    x = tensors["x"]
    channels = x.shape[1]
    what = draw(
        st.sampled_from(
            [
                "tensor",
                "channels",
                "no_channels",
                "kernel_size",
                "stride",
                "dilation",
                "padding",
                "activation",
                "vector_shape",
                "residual_shape",
                "too_small",
            ]
        )
    )
    if what == "tensor":
        name = draw(st.sampled_from([n for n, t in tensors.items() if t is not None]))
        tensors[name] = _tensor_breakage(draw, tensors[name])
        return tensors, kwargs, name
    if what == "channels":
        tensors["weight"] = torch.randn(channels + draw(st.integers(1, 3)), 1, 3, 3)
        return tensors, kwargs, "weight"
    if what == "no_channels":
        tensors = {**dict.fromkeys(tensors), "x": x[:, :0], "weight": tensors["weight"][:0]}
        return tensors, kwargs, "x"
    if what == "kernel_size":
        tensors["weight"] = torch.randn(channels, 1, MAX_KERNEL + draw(st.integers(1, 4)), 1)
        return tensors, kwargs, "weight"
    if what in ("stride", "dilation"):
        low = draw(st.integers(-3, 0))
        kwargs[what] = draw(st.sampled_from([low, (1, low), (1, 1, 1), 1.5, "2", True]))
        return tensors, kwargs, what
    if what == "padding":
        kwargs["padding"] = draw(st.sampled_from([-1, (0, -2), "full", "SAME", 1.0, (1, 2, 3)]))
        return tensors, kwargs, "padding"
    if what == "activation":
        kwargs["activation"] = draw(st.sampled_from(["tanh", "GELU", 1, "silu"]))
        return tensors, kwargs, "activation"
    if what == "vector_shape":
        name = draw(st.sampled_from(["bias", "scale", "shift"]))
        tensors[name] = torch.randn(channels + draw(st.integers(1, 3)))
        return tensors, kwargs, name
    if what == "residual_shape":
        tensors["residual"] = torch.randn(x.shape[0], channels, x.shape[2] + 40, x.shape[3])
        return tensors, kwargs, "residual"
    kh, kw = tensors["weight"].shape[2:]
    tensors["x"] = torch.randn(x.shape[0], channels, 1, 1)
    tensors["weight"] = torch.randn(channels, 1, kh + 2, kw + 2)
    tensors["residual"] = None
    kwargs.update(padding="valid", dilation=1)
    return tensors, kwargs, "x"


def _bad_attention_common(draw, tensors, kwargs):
    """One wrong thing shared by the three attention ops: q/k/v rank, dtype, device, head dims, batch, scale."""
    what = draw(st.sampled_from(["tensor", "head_dim", "no_head_dim", "no_value_dim", "batch", "tokens_v", "scale"]))
    k, v = tensors["k"], tensors["v"]
    if what == "tensor":
        name = draw(st.sampled_from(["q", "k", "v"]))
        tensors[name] = _tensor_breakage(draw, tensors[name])
        return name
    if what == "head_dim":
        tensors["k"] = torch.randn(*k.shape[:3], k.shape[3] + draw(st.integers(1, 3)))
        return "k"
    if what == "no_head_dim":
        tensors["q"], tensors["k"] = tensors["q"][..., :0], k[..., :0]
        return "q"
    if what == "no_value_dim":
        tensors["v"] = v[..., :0]
        return "v"
    if what == "batch":
        tensors["k"] = torch.randn(k.shape[0] + 1, *k.shape[1:])
        return "k"
    if what == "tokens_v":
        tensors["v"] = torch.randn(v.shape[0], v.shape[1], v.shape[2] + 1, v.shape[3])
        return "v"
    kwargs["scale"] = draw(st.sampled_from(["0.5", [0.5], torch.tensor(0.5), True, math.nan, math.inf, -math.inf]))
    return "scale"


@st.composite
def bad_attention_calls(draw):
    """(op name, tensors, kwargs, the argument the error must name): one thing wrong."""
    op_name = draw(st.sampled_from(sorted(ATTENTION)))
    inputs = {
        "rel_pos_attention": rel_pos_inputs(max_window=3, dtypes=(torch.float32,)),
        "levit_attention": levit_inputs(max_resolution=4, dtypes=(torch.float32,)),
        "biased_attention": biased_inputs(max_tokens=6, dtypes=(torch.float32,)),
    }[op_name]
    tensors, kwargs = draw(inputs)
    if draw(st.booleans()):
        return op_name, tensors, kwargs, _bad_attention_common(draw, tensors, kwargs)
    q = tensors["q"]
    if op_name == "rel_pos_attention":
        what = draw(st.sampled_from(["table", "table_rows", "window"]))
        if what == "table":
            tensors["table"] = _tensor_breakage(draw, tensors["table"])
        elif what == "table_rows":
            tensors["table"] = torch.randn(tensors["table"].shape[0] + 1, q.shape[1])
        else:
            kwargs["window"] = draw(st.sampled_from([0, (0, 1), (1, 2, 3), 2.0, "7", (q.shape[2] + 1, 1)]))
            return op_name, tensors, kwargs, "window" if kwargs["window"] != (q.shape[2] + 1, 1) else "q"
        return op_name, tensors, kwargs, "table"
    if op_name == "levit_attention":
        what = draw(st.sampled_from(["biases", "biases_heads", "resolution", "stride"]))
        if what == "biases":
            tensors["biases"] = _tensor_breakage(draw, tensors["biases"])
            return op_name, tensors, kwargs, "biases"
        if what == "biases_heads":
            tensors["biases"] = torch.randn(q.shape[1] + 1, tensors["biases"].shape[1])
            return op_name, tensors, kwargs, "biases"
        kwargs[what] = draw(st.sampled_from([0, -1, 2.0, "4", None]))
        return op_name, tensors, kwargs, what
    what = draw(st.sampled_from(["5-D", "0-D", "broken"]))
    if what == "5-D" or (what == "broken" and tensors["bias"] is None):
        tensors["bias"] = torch.randn(2, *q.shape[:2], q.shape[2], tensors["k"].shape[2])
    elif what == "0-D":
        tensors["bias"] = torch.tensor(1.0)
    else:
        tensors["bias"] = _tensor_breakage(draw, tensors["bias"])
    return op_name, tensors, kwargs, "bias"


def assert_rejected(call, tensors: dict[str, object], argument: str) -> None:
    """call() raises ValueError or TypeError naming ``argument`` on every backend; no input tensor changes."""
    before = snapshot({n: t for n, t in tensors.items() if isinstance(t, torch.Tensor) and t.device.type != "meta"})
    for backend in ("auto", "eager", "triton", "cuda"):
        with vitkern.backend(backend), pytest.raises((ValueError, TypeError)) as info:
            call()
        assert re.search(rf"\b{argument}\b", str(info.value)), (
            f"{backend}: the error does not name {argument!r}: {info.value}"
        )
    assert_unchanged(tensors, before)


@given(case=bad_conv_calls())
@examples("auto")
def test_depthwise_conv2d_rejects_bad_input(case):
    tensors, kwargs, argument = case
    assert_rejected(lambda: vitkern.ops.depthwise_conv2d(**tensors, **kwargs), tensors, argument)


@given(case=bad_attention_calls())
@examples("auto")
def test_attention_rejects_bad_input(case):
    op_name, tensors, kwargs, argument = case
    op = ATTENTION[op_name][0]
    assert_rejected(lambda: op(**tensors, **kwargs), tensors, argument)


# --- regressions: failures found by the tests above and by hand, each a plain test ---------------------------------

FUSED_ATTENTION_BACKENDS = ["auto", pytest.param("triton", marks=NEEDS_TRITON)]


@pytest.mark.parametrize("backend", FUSED_ATTENTION_BACKENDS)
@pytest.mark.parametrize("heads_masked", ["one", "all"])
def test_rel_pos_table_holding_minus_inf_gives_the_reference_on_every_backend(backend, heads_masked):
    """auto on CPU returned NaN for a table column of -inf, where eager and triton give zeros (fully masked rows)."""
    q, k, v = torch.randn(3, 1, 2, 4, 8).unbind(0)
    table = torch.randn(9, 2)
    table[:, 0 if heads_masked == "one" else slice(None)] = float("-inf")
    expected = reference.rel_pos_attention(q.double(), k.double(), v.double(), table.double(), (2, 2))
    with vitkern.backend(backend):
        out = vitkern.ops.rel_pos_attention(q, k, v, table, 2)
    assert_close(out, expected.float())
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))


@pytest.mark.parametrize("backend", FUSED_ATTENTION_BACKENDS)
def test_levit_biases_holding_minus_inf_give_the_reference_on_every_backend(backend):
    q, k, v = torch.randn(3, 1, 2, 4, 8).unbind(0)
    biases = torch.randn(2, 4)
    biases[1] = float("-inf")
    biases[0, 3] = float("-inf")  # a partly masked head beside a fully masked one
    expected = reference.levit_attention(q.double(), k.double(), v.double(), biases.double(), 2)
    with vitkern.backend(backend):
        out = vitkern.ops.levit_attention(q, k, v, biases, 2)
    assert_close(out, expected.float())


ALL_BACKENDS = ["auto", "eager", "triton", "cuda"]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_head_dim_zero_is_a_value_error(backend):
    """It was a ZeroDivisionError from the default scale."""
    q = torch.randn(1, 2, 4, 0)
    with vitkern.backend(backend), pytest.raises(ValueError, match="q: expected head_dim >= 1"):
        vitkern.ops.biased_attention(q, q, torch.randn(1, 2, 4, 3))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_zero_channels_is_a_value_error(backend):
    """auto/eager raised torch's "non-positive groups", the emulated CUDA backend returned an empty tensor."""
    with vitkern.backend(backend), pytest.raises(ValueError, match="x: expected at least 1 channel"):
        vitkern.ops.depthwise_conv2d(torch.randn(1, 0, 5, 5), torch.randn(0, 1, 3, 3))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("scale", [math.nan, math.inf])
def test_non_finite_scale_is_a_value_error(backend, scale):
    """A NaN scale gave NaN outputs on every backend without a word."""
    q = torch.randn(1, 2, 4, 8)
    with vitkern.backend(backend), pytest.raises(ValueError, match="scale: expected a finite number"):
        vitkern.ops.biased_attention(q, q, q, scale=scale)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_zero_dim_bias_is_a_value_error(backend):
    """A 0-D bias was broadcast silently; a constant does not change the softmax, so it is refused."""
    q = torch.randn(1, 2, 4, 8)
    with vitkern.backend(backend), pytest.raises(ValueError, match="bias: expected 1 to 4 dims"):
        vitkern.ops.biased_attention(q, q, q, torch.tensor(1.0))


def test_half_precision_convolution_on_cpu_is_not_measured(monkeypatch):
    """The README's fp16 ConvMixer call measured both memory formats on its first call, which cost more than any
    choice could save."""
    monkeypatch.setattr(vitkern._tuning, "_choices", {})
    x = torch.randn(2, 64, 48, 48, dtype=torch.float16)
    weight = torch.randn(64, 1, 9, 9, dtype=torch.float16)
    with vitkern.backend("auto"):
        vitkern.ops.depthwise_conv2d(x, weight, activation="gelu")
    assert vitkern._tuning.choices() == {}
    with vitkern.backend("auto"):
        vitkern.ops.depthwise_conv2d(x.float(), weight.float(), activation="gelu")
    assert len(vitkern._tuning.choices()) == 1, "the fp32 call of that size was not measured: the test proves nothing"


def test_one_channel_scale_and_shift_gradients_on_the_emulated_cuda_backend():
    """Found by test_depthwise_conv2d_cuda_emulated: x (1, 1, 1, 1), a 1x1 kernel, scale and shift."""
    require_build(AVAILABLE["cuda-emulated"], "needs the emulation build vitkern._emulation: VITKERN_BUILD_EMULATION=1")
    tensors = {
        "x": torch.tensor([[[[1.5410]]]]),
        "weight": torch.tensor([[[[0.4623]]]]),
        "bias": None,
        "scale": torch.tensor([1.5410]),
        "shift": torch.tensor([1.5410]),
        "residual": None,
    }
    check_conv("cuda", (tensors, {"stride": 1, "padding": "same", "dilation": 1, "activation": None}))
