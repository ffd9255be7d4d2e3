"""vitkern.ops.depthwise_conv2d against F.conv2d plus the plain epilogue, on every backend.

The expected side is written here from F.pad, F.conv2d, F.gelu and F.relu (independent of vitkern.reference) and
run in float64 with autograd for the gradients. "triton" runs the Triton kernels (under the interpreter on CPU),
"cuda" the CUDA C++ kernels (through the emulation build on CPU); "auto" (the CPU path) and "eager" are checked too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vitkern
from vitkern import _tuning
from vitkern.dispatch import Call
from vitkern.kernels import depthwise_conv as dwk
from vitkern.ops.depthwise_conv import REGISTRY
from vitkern.ops.depthwise_conv import depthwise_conv2d
from vitkern.testing import assert_close

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

KERNEL_BACKENDS = ["triton", "cuda"]
NAMES = ("x", "weight", "bias", "scale", "shift", "residual")
NCHW = torch.contiguous_format
CHANNELS_LAST = torch.channels_last
LAYOUTS = [pytest.param(NCHW, id="nchw"), pytest.param(CHANNELS_LAST, id="channels_last")]


def expected_conv(x, weight, bias, stride, padding, dilation, activation, scale, shift, residual):
    """act(conv(x, weight) + bias) * scale + shift + residual from F.pad / F.conv2d; "same" padding by hand:
    dilation * (k - 1) in total per dimension, the odd element at the bottom/right."""
    stride = (stride, stride) if isinstance(stride, int) else stride
    dilation = (dilation, dilation) if isinstance(dilation, int) else dilation
    kh, kw = weight.shape[2:]
    if padding == "same":
        total_h, total_w = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
        pads = (total_w // 2, total_w - total_w // 2, total_h // 2, total_h - total_h // 2)
    elif padding == "valid":
        pads = (0, 0, 0, 0)
    elif isinstance(padding, int):
        pads = (padding,) * 4
    else:
        pads = (padding[1], padding[1], padding[0], padding[0])
    z = F.conv2d(F.pad(x, pads), weight, bias, stride=stride, dilation=dilation, groups=x.shape[1])
    if activation == "gelu":
        z = F.gelu(z)
    elif activation == "relu":
        z = F.relu(z)
    if scale is not None:
        z = z * scale[None, :, None, None]
    if shift is not None:
        z = z + shift[None, :, None, None]
    if residual is not None:
        z = z + residual
    return z


def output_shape(shape, kernel, stride, padding, dilation):
    """The output shape, from a meta-device F.conv2d of the same arguments."""
    x = torch.empty(shape, device="meta")
    weight = torch.empty((shape[1], 1, *kernel), device="meta")
    return expected_conv(x, weight, None, stride, padding, dilation, None, None, None, None).shape


def make_inputs(shape, kernel, stride=1, padding="same", dilation=1, dtype=torch.float32, layout=NCHW):
    """x, weight, bias, scale, shift and residual; x and residual in ``layout``."""
    c = shape[1]
    x = torch.randn(shape, device=DEVICE).to(dtype=dtype, memory_format=layout)
    weight = (torch.randn((c, 1, *kernel), device=DEVICE) / (kernel[0] * kernel[1]) ** 0.5).to(dtype)
    residual = torch.randn(output_shape(shape, kernel, stride, padding, dilation), device=DEVICE)
    return {
        "x": x,
        "weight": weight,
        "bias": torch.randn(c, device=DEVICE).to(dtype),
        "scale": torch.randn(c, device=DEVICE).to(dtype),
        "shift": torch.randn(c, device=DEVICE).to(dtype),
        "residual": residual.to(dtype=dtype, memory_format=layout),
    }


def run_op(backend, inputs, grads, dy, **conv):
    """The op on ``backend``; returns the output and the gradients of the inputs named in ``grads``."""
    leaves = {k: v.detach().clone().requires_grad_(k in grads) for k, v in inputs.items()}
    with vitkern.backend(backend):
        y = depthwise_conv2d(**leaves, **conv)
    if grads:
        y.backward(dy)
    return y, {k: leaves[k].grad for k in grads}


def run_expected(inputs, grads, dy, dtype, **conv):
    """The independent expected side in ``dtype`` (on CPU): output and gradients."""
    leaves = {k: v.detach().cpu().to(dtype).requires_grad_(k in grads) for k, v in inputs.items()}
    y = expected_conv(
        leaves["x"],
        leaves["weight"],
        leaves.get("bias"),
        conv.get("stride", 1),
        conv.get("padding", "same"),
        conv.get("dilation", 1),
        conv.get("activation"),
        leaves.get("scale"),
        leaves.get("shift"),
        leaves.get("residual"),
    )
    if grads:
        y.backward(dy.cpu().to(dtype))
    return y, {k: leaves[k].grad for k in grads}


def layout_of(x):
    return CHANNELS_LAST if x.is_contiguous(memory_format=CHANNELS_LAST) and not x.is_contiguous() else NCHW


def check_op(backend, inputs, grads=NAMES, **conv):
    """The op's output and gradients against the expected side (float64; for fp16 also the same-dtype PyTorch
    error bound of vitkern.testing), the output's dtype and memory format, and that no input was modified."""
    grads = tuple(g for g in grads if g in inputs)
    originals = {k: v.clone() for k, v in inputs.items()}
    x = inputs["x"]
    shape = output_shape(
        x.shape, inputs["weight"].shape[2:], conv.get("stride", 1), conv.get("padding", "same"), conv.get("dilation", 1)
    )
    dy = torch.randn(shape, device=DEVICE).to(x.dtype)
    y, got = run_op(backend, inputs, grads, dy, **conv)
    reference, reference_grads = run_expected(inputs, grads, dy, torch.float64, **conv)
    same_dtype, same_dtype_grads = None, {}
    if x.dtype != torch.float32:
        same_dtype, same_dtype_grads = run_expected(inputs, grads, dy, x.dtype, **conv)
    assert y.dtype == x.dtype
    assert y.is_contiguous(memory_format=layout_of(x)), "the output lost the input's memory format"
    assert_close(y.cpu(), reference.float(), same_dtype, name="output")
    for name in grads:
        assert got[name] is not None, f"no gradient for {name}"
        assert_close(got[name].cpu(), reference_grads[name].float(), same_dtype_grads.get(name), name=f"d{name}")
    for name, original in originals.items():
        assert torch.equal(inputs[name], original), f"{name} was modified in place"


# --- the expected side itself ---------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("kernel", [(3, 3), (4, 4), (4, 3), (5, 2)])
@pytest.mark.parametrize("dilation", [1, 2])
def test_expected_same_padding_matches_conv2d_same(kernel, dilation):
    """The test's hand-written "same" padding is F.conv2d(padding="same"), even kernels included."""
    x, weight = torch.randn(2, 3, 11, 10), torch.randn(3, 1, *kernel)
    got = expected_conv(x, weight, None, 1, "same", dilation, None, None, None, None)
    torch.testing.assert_close(got, F.conv2d(x, weight, padding="same", dilation=dilation, groups=3))


# --- kernel backends ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kernel, layout",
    [(1, NCHW), (3, CHANNELS_LAST), (7, NCHW), (7, CHANNELS_LAST), (9, NCHW), (13, NCHW)],
    ids=["1-nchw", "3-cl", "7-nchw", "7-cl", "9-nchw", "13-nchw"],
)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_sizes(backend, kernel, layout):
    inputs = make_inputs((2, 3, 11, 9), (kernel, kernel), layout=layout)
    check_op(backend, inputs, activation="gelu")


@pytest.mark.slow
@pytest.mark.parametrize(
    "kernel, layout",
    [pytest.param((31, 31), NCHW, id="31x31-nchw"), pytest.param((51, 5), CHANNELS_LAST, id="51x5-cl")],
)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_large_kernels(backend, kernel, layout):
    """Width 8: the NCHW case reads its rows as vectors (CUDA C++), most of each vector outside the tensor."""
    inputs = make_inputs((1, 3, 9, 8), kernel, layout=layout)
    check_op(backend, inputs, activation="gelu")


@pytest.mark.parametrize(
    "kernel, stride, padding, dilation, layout",
    [
        pytest.param((4, 4), 1, "same", 1, NCHW, id="even-same"),
        pytest.param((5, 3), 1, "same", 2, NCHW, id="rect-same-dil2"),
        pytest.param((3, 3), 2, "same", 1, NCHW, id="same-s2"),
        pytest.param((4, 5), 2, "same", 2, NCHW, id="even-same-s2-dil2"),
        pytest.param((4, 5), 2, "same", 2, CHANNELS_LAST, id="even-same-s2-dil2-cl"),
        pytest.param((3, 3), 1, "valid", 1, NCHW, id="valid"),
        pytest.param((5, 5), 2, "valid", 2, CHANNELS_LAST, id="valid-s2-dil2-cl"),
        pytest.param((3, 3), 2, 1, 1, NCHW, id="int-s2"),
        pytest.param((5, 3), (2, 1), (2, 1), (1, 2), NCHW, id="pair"),
        pytest.param((5, 3), (2, 1), (2, 1), (1, 2), CHANNELS_LAST, id="pair-cl"),
        pytest.param((3, 4), (1, 2), 0, (2, 1), NCHW, id="zero-pad"),
    ],
)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_stride_padding_dilation(backend, kernel, stride, padding, dilation, layout):
    inputs = make_inputs((2, 3, 10, 9), kernel, stride, padding, dilation, layout=layout)
    check_op(backend, inputs, stride=stride, padding=padding, dilation=dilation, activation="relu")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", [None, "gelu", "relu"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_activations_every_gradient(backend, activation, layout):
    inputs = make_inputs((2, 3, 8, 9), (5, 5), layout=layout)
    check_op(backend, inputs, activation=activation)


@pytest.mark.parametrize(
    "present, grads",
    [
        (("x", "weight"), ("x", "weight")),
        (("x", "weight", "bias"), ("bias",)),
        (("x", "weight", "scale"), ("weight", "scale")),
        (("x", "weight", "shift", "residual"), ("shift", "residual")),
        (NAMES, ("x",)),
        (NAMES, ("scale", "bias")),
    ],
    ids=["plain", "bias-only", "scale", "shift-residual", "dx-only", "vectors-only"],
)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_epilogue_subsets(backend, present, grads):
    """Each epilogue tensor on its own and gradients asked for a subset of the inputs."""
    inputs = {k: v for k, v in make_inputs((2, 3, 8, 9), (3, 3)).items() if k in present}
    check_op(backend, inputs, grads, activation="gelu")


@pytest.mark.parametrize(
    "shape, layout",
    [
        pytest.param((2, 3, 13, 11), NCHW, id="nchw-143px"),
        pytest.param((1, 2, 17, 19), NCHW, id="nchw-323px"),
        pytest.param((2, 17, 7, 9), CHANNELS_LAST, id="cl-17ch"),
        pytest.param((1, 33, 5, 6), CHANNELS_LAST, id="cl-33ch"),
    ],
)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_sizes_off_block_multiples(backend, shape, layout):
    """Pixel and channel counts that are not multiples of any block size, several blocks per axis."""
    inputs = make_inputs(shape, (3, 3), layout=layout)
    check_op(backend, inputs, activation="gelu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "kernel, stride, padding, dilation",
    [((7, 7), 1, "same", 1), ((5, 4), 2, (2, 1), (1, 2))],
    ids=["7x7", "5x4-s2-dil"],
)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_nchw_widths_of_whole_vectors(backend, kernel, stride, padding, dilation, dtype):
    """NCHW with a width of 16, a multiple of every dtype's 16-byte vector: the CUDA C++ kernels read the input
    tile's rows as aligned vectors, tile rows starting mid-vector and vectors reaching past the tensor's edges."""
    inputs = make_inputs((2, 3, 9, 16), kernel, stride, padding, dilation, dtype=dtype)
    check_op(backend, inputs, stride=stride, padding=padding, dilation=dilation, activation="gelu")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_input_off_a_vector_boundary(backend, layout):
    """x starting 4 bytes past a 16-byte boundary (a view at storage offset 1), widths and channels that would
    otherwise be read in vectors: the result and gradients equal those of an aligned copy."""
    shape = (2, 8, 6, 8)
    inputs = make_inputs(shape, (3, 3), layout=layout)
    storage = torch.zeros(inputs["x"].numel() + 1, device=DEVICE)
    if layout == NCHW:
        shifted = storage[1:].view(shape)
    else:
        shifted = storage[1:].view(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2)
    shifted.copy_(inputs["x"])
    assert shifted.data_ptr() % 16 != 0 and layout_of(shifted) == layout
    dy = torch.randn(shape, device=DEVICE)
    results = []
    for x in (shifted, inputs["x"].clone()):
        leaves = [x.requires_grad_(), inputs["weight"].clone().requires_grad_()]
        with vitkern.backend(backend):
            y = depthwise_conv2d(*leaves, activation="relu")
        y.backward(dy)
        results.append((y.detach(), *(t.grad for t in leaves)))
    for name, got, want in zip(("output", "dx", "dweight"), *results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(
    "kernel, stride, layout",
    [pytest.param((3, 3), 1, CHANNELS_LAST, id="3x3-cl"), pytest.param((7, 7), 2, NCHW, id="7x7-s2-nchw")],
)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fp16(backend, kernel, stride, layout):
    inputs = make_inputs((2, 4, 11, 9), kernel, stride, dtype=torch.float16, layout=layout)
    check_op(backend, inputs, stride=stride, activation="gelu")


@pytest.mark.parametrize(
    "channels, dtype, kernel, stride, dilation",
    [
        pytest.param(48, torch.float32, (5, 5), 2, 1, id="48ch-fp32-s2"),  # aligned channels, a partial block
        pytest.param(64, torch.float16, (7, 7), 1, 1, id="64ch-fp16"),  # whole 64-channel blocks
        pytest.param(128, torch.float32, (3, 5), 1, 2, id="128ch-fp32-dil2"),
        pytest.param(16, torch.float32, (4, 5), 1, 2, id="16ch-fp32-even-dil2"),  # uneven "same" padding for dx
    ],
)
def test_channels_last_forward_tiles(channels, dtype, kernel, stride, dilation):
    """The Triton channels_last forward's 16-byte-vector tile (channels a multiple of 16, full and partial 64-channel
    blocks) with every epilogue input, and dx and dweight through the z it saves; at stride 1 dx is the same kernel
    on gz with the weights flipped (the epilogue's own gradients are the other tests' business)."""
    inputs = make_inputs((2, channels, 7, 6), kernel, stride, "same", dilation, dtype=dtype, layout=CHANNELS_LAST)
    check_op("triton", inputs, ("x", "weight"), stride=stride, dilation=dilation, activation="gelu")


@pytest.mark.parametrize("size", dwk.ROW_SIZES)
@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((2, 3, 20, 37), id="20x37"),  # two runs of rows, two column blocks, 2 images in a program
        pytest.param((9, 1, 21, 28), id="9x21x28"),  # rows in vectors, programs of 8 images and of 1
    ],
)
def test_fp16_row_kernel(monkeypatch, size, shape):
    """The forward's tensor-core row kernel (NCHW fp16, stride 1, "same" padding): every kernel size it takes, tiles
    cut by the image edges, both input windows, programs over several images, the whole epilogue, and the
    gradients through the z it saves."""
    monkeypatch.setattr(dwk, "ROW_MIN_PROGRAMS", 1)  # as many images a program as ROW_IMAGES allows
    inputs = make_inputs(shape, (size, size), dtype=torch.float16)
    assert dwk.uses_row_kernel(inputs["x"], inputs["weight"], [1, 1], [(size - 1) // 2] * 4, [1, 1])
    check_op("triton", inputs, activation="gelu")


@pytest.mark.parametrize("size", dwk.ROW_SIZES)
def test_fp16_row_kernel_dx(size):
    """Without an activation or scale gz is dy itself, and dx runs on the row kernel with the weights flipped: dx,
    dweight and the bias and shift gradients against the expected side (with them, test_fp16_row_kernel)."""
    inputs = make_inputs((2, 3, 19, 35), (size, size), dtype=torch.float16)
    del inputs["scale"]
    check_op("triton", inputs)


def test_row_kernel_window_holds_every_size():
    """The input window of a tile reaches ALIGN columns past it on each side: enough for every padding it takes."""
    for size in dwk.ROW_SIZES:
        for width in (28, 30):
            align, vec = dwk.row_window(width, size)
            assert (size - 1) // 2 <= align and width % vec == 0 and align % vec == 0


def test_row_kernel_images_per_program():
    """Up to ROW_IMAGES images a program, fewer where the grid would be small, never none."""
    assert dwk.row_images_per_program(64, 3072) == dwk.ROW_IMAGES
    assert dwk.row_images_per_program(64, 96) == 6  # 64 * 96 // 1024
    assert dwk.row_images_per_program(2, 6) == 1
    assert dwk.row_images_per_program(3, 10**6) == 3


@pytest.mark.parametrize(
    "size, stride, padding, dtype, layout",
    [
        pytest.param(7, 1, [2, 2, 3, 3], torch.float16, NCHW, id="not-same"),
        pytest.param(7, 2, [3, 3, 3, 3], torch.float16, NCHW, id="stride2"),
        pytest.param(11, 1, [5, 5, 5, 5], torch.float16, NCHW, id="11x11"),
        pytest.param(7, 1, [3, 3, 3, 3], torch.float32, NCHW, id="fp32"),
        pytest.param(7, 1, [3, 3, 3, 3], torch.float16, CHANNELS_LAST, id="channels_last"),
    ],
)
def test_row_kernel_takes_only_its_calls(size, stride, padding, dtype, layout):
    """Calls outside the row kernel's set go to the general forward (whose results the other tests check)."""
    x = torch.empty((1, 2, 9, 9), dtype=dtype).to(memory_format=layout)
    weight = torch.empty((2, 1, size, size), dtype=dtype)
    assert not dwk.uses_row_kernel(x, weight, [stride, stride], padding, [1, 1])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_strided_vectors(backend):
    """bias, scale and shift given as strided views (the columns of one (C, 3) tensor), forward and gradients."""
    inputs = make_inputs((2, 3, 8, 9), (3, 3))
    x, weight = inputs["x"], inputs["weight"]
    columns = torch.randn(3, 3, device=DEVICE)
    dy = torch.randn(2, 3, 8, 9, device=DEVICE)
    results = []
    for run_backend in (backend, None):
        leaf = columns.clone().requires_grad_()
        bias, scale, shift = leaf.unbind(1)
        if run_backend is None:
            y = expected_conv(x, weight, bias, 1, "same", 1, "gelu", scale, shift, None)
        else:
            with vitkern.backend(run_backend):
                y = vitkern.ops.depthwise_conv2d(x, weight, bias, activation="gelu", scale=scale, shift=shift)
        y.backward(dy)
        results.append((y.detach(), leaf.grad))
    (y, grad), (expected, expected_grad) = results
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gradients_deterministic(backend, layout):
    """Weight and per-channel gradients are bitwise identical across runs (no float atomics)."""
    inputs = make_inputs((2, 3, 9, 9), (3, 3), layout=layout)
    dy = torch.randn(2, 3, 9, 9, device=DEVICE)
    runs = [run_op(backend, inputs, ("weight", "bias", "scale", "shift"), dy, activation="gelu")[1] for _ in range(2)]
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), f"d{name} differs between two runs"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend):
    """torch.library.opcheck on the forward and backward custom ops (schema, fake tensors, autograd)."""
    inputs = make_inputs((1, 3, 6, 5), (3, 3))
    x, weight, bias, scale, shift, residual = (inputs[k] for k in NAMES)
    conv = ([1, 1], [1, 1, 1, 1], [1, 1], 1)
    impl = REGISTRY.select(Call(x.device, x.dtype), backend).name
    leaves = tuple(t.clone().requires_grad_() for t in (x, weight, bias, scale, shift, residual))
    torch.library.opcheck(torch.ops.vitkern.depthwise_conv2d, (*leaves, *conv, True, impl))
    _, z = torch.ops.vitkern.depthwise_conv2d(x, weight, bias, scale, shift, residual, *conv, True, impl)
    backward_args = (torch.randn_like(z), x, weight, z, scale, *conv, [True] * 5, impl)
    # The backward op has no autograd of its own (no double backward), so aot_dispatch_dynamic does not apply.
    torch.library.opcheck(
        torch.ops.vitkern.depthwise_conv2d_backward,
        backward_args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("backend", ["auto", *KERNEL_BACKENDS])
def test_torch_compile_fullgraph(backend, compiler):
    """A function using the op compiles with fullgraph=True and matches eager, forward and gradients; aot_eager
    traces through the fake and autograd registrations (on "auto" with CPU tensors: through the CPU path's plain
    ops), inductor also generates code around the op."""
    inputs = make_inputs((2, 3, 8, 7), (3, 3), layout=CHANNELS_LAST)

    def block(x, weight, bias, scale, shift, residual):
        y = depthwise_conv2d(x * 2.0, weight, bias, activation="gelu", scale=scale, shift=shift, residual=residual)
        return y.relu() + x

    torch._dynamo.reset()
    compiled = torch.compile(block, backend=compiler, fullgraph=True)
    leaves = [inputs[k].clone().requires_grad_() for k in NAMES]
    eager_leaves = [inputs[k].clone().requires_grad_() for k in NAMES]
    with vitkern.backend(backend):
        got = compiled(*leaves)
        got.sum().backward()
        want = block(*eager_leaves)
        want.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(NAMES, leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"d{name}: {m}")


# --- plain-PyTorch backends -----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "kernel, stride, padding, dilation",
    [
        ((3, 3), 1, "same", 1),
        ((4, 4), 2, "same", 1),
        ((9, 9), 1, "same", 1),
        ((7, 5), (1, 2), (3, 1), 2),
        ((3, 15), 1, "same", 1),
    ],
    ids=["3x3", "even-s2", "9x9", "rect-pair", "3x15"],
)
@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_plain_backends(backend, kernel, stride, padding, dilation, layout):
    """The CPU path (auto on CPU tensors) with its default choices, and the eager reference."""
    inputs = make_inputs((2, 6, 16, 17), kernel, stride, padding, dilation, layout=layout)
    check_op(backend, inputs, stride=stride, padding=padding, dilation=dilation, activation="gelu")


@pytest.mark.parametrize("kernel", [(9, 9), (3, 15)])
@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_plain_backends_forward_only(backend, kernel):
    """Without gradients the CPU path writes the epilogue over the convolution's output, never over an input."""
    check_op(backend, make_inputs((2, 6, 16, 17), kernel), grads=(), activation="relu")


@pytest.fixture
def forced_formats(monkeypatch):
    """Every CPU-path problem gets a "measured" choice of memory format, and the measurement returns the formats
    the test puts in the dict ("forward", "backward"); the candidates are still built and run once. The fixture
    checks at teardown that the test's calls did ask for a choice."""
    forced, calls = {}, []

    def choose(key, make_candidates, default):
        candidates = make_candidates()
        assert set(candidates) == {"nchw", "channels_last"} and default in candidates
        with torch.no_grad():
            for run in candidates.values():
                run()
        calls.append(key[1])
        return forced[key[1]]

    monkeypatch.setattr(_tuning, "MIN_TUNED_MACS", 0)
    monkeypatch.setattr(_tuning, "MIN_TUNED_FORWARD_MACS", 0)
    monkeypatch.setattr(_tuning, "UNTUNED_DTYPES", ())  # the split formats are checked in fp16 too
    monkeypatch.setattr(_tuning, "choose", choose)
    yield forced
    assert "forward" in calls and ("backward" in calls or "backward" not in forced), "no format choice was asked for"


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU path runs on CPU tensors")
@pytest.mark.parametrize("backward_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("forward_format", ["nchw", "channels_last"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "kernel, stride, padding, dilation",
    [((7, 7), 1, "same", 1), ((4, 5), 2, "same", 2)],
    ids=["7x7", "even-same-s2-dil2"],
)
def test_cpu_path_every_format_choice(
    forced_formats, forward_format, backward_format, layout, kernel, stride, padding, dilation
):
    """Forward and backward of the CPU path in each memory format, apart or together, from either input layout:
    the output keeps the input's layout and every gradient matches, also when only some are asked for."""
    forced_formats.update(forward=forward_format, backward=backward_format)
    conv = dict(stride=stride, padding=padding, dilation=dilation, activation="gelu")
    inputs = make_inputs((2, 5, 12, 11), kernel, stride, padding, dilation, layout=layout)
    check_op("auto", inputs, **conv)
    check_op("auto", inputs, grads=("x",), **conv)
    check_op("auto", inputs, grads=("weight", "scale"), **conv)
    check_op("auto", inputs, grads=(), **conv)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU path runs on CPU tensors")
@pytest.mark.parametrize("forward_format, backward_format", [("nchw", "channels_last"), ("channels_last", "nchw")])
def test_cpu_path_split_formats_fp16(forced_formats, forward_format, backward_format):
    forced_formats.update(forward=forward_format, backward=backward_format)
    check_op("auto", make_inputs((2, 4, 11, 9), (7, 7), dtype=torch.float16), activation="gelu")


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU path runs on CPU tensors")
@pytest.mark.parametrize("forward_format, backward_format", [("nchw", "channels_last"), ("channels_last", "nchw")])
def test_cpu_path_split_formats_double_backward(forced_formats, forward_format, backward_format):
    """Second derivatives through the CPU path with forward and backward in different formats, against the
    expected side (GELU makes them depend on the convolution's output)."""
    forced_formats.update(forward=forward_format, backward=backward_format)
    inputs = make_inputs((1, 3, 7, 6), (3, 3))
    dy = torch.randn(1, 3, 7, 6)
    direction = torch.randn(1, 3, 7, 6)

    def second_derivatives(conv, dtype):
        x, weight, bias = (inputs[k].to(dtype).requires_grad_() for k in ("x", "weight", "bias"))
        y = conv(x, weight, bias, 1, "same", 1, "gelu", None, None, None)
        (dx,) = torch.autograd.grad(y, x, dy.to(dtype), create_graph=True)
        return torch.autograd.grad((dx * direction.to(dtype)).sum(), (x, weight, bias))

    with vitkern.backend("auto"):
        got = second_derivatives(depthwise_conv2d, torch.float32)
    expected = second_derivatives(expected_conv, torch.float64)
    for name, a, b in zip(("x", "weight", "bias"), got, expected):
        assert_close(a, b.float(), name=f"d(dx)/d{name}")


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU path runs on CPU tensors")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpu_path_measures_once_per_problem(monkeypatch, layout):
    """With real timings: one forward and one backward choice per problem signature, reused by later calls."""
    monkeypatch.setattr(_tuning, "MIN_TUNED_MACS", 0)
    monkeypatch.setattr(_tuning, "MIN_TUNED_FORWARD_MACS", 0)
    monkeypatch.setattr(_tuning, "_choices", {})
    inputs = make_inputs((2, 4, 9, 10), (5, 5), layout=layout)
    check_op("auto", inputs, activation="relu")
    choices = _tuning.choices()
    assert sorted(key[1] for key in choices) == ["backward", "forward"]
    assert set(choices.values()) <= {"nchw", "channels_last"}
    check_op("auto", inputs, activation="relu")
    assert _tuning.choices() == choices


@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_plain_backends_fp16(backend):
    inputs = make_inputs((2, 4, 11, 9), (7, 7), dtype=torch.float16)
    check_op(backend, inputs, activation="gelu")


# --- bad input ------------------------------------------------------------------------------------------------


def _bad_cases():
    x = torch.randn(2, 3, 8, 8)
    w = torch.randn(3, 1, 3, 3)
    return [
        ("weight", dict(x=x, weight=torch.randn(3, 3, 3))),
        ("weight", dict(x=x, weight=torch.randn(3, 2, 3, 3))),
        ("weight", dict(x=x, weight=torch.randn(4, 1, 3, 3))),
        ("weight", dict(x=x, weight=torch.randn(3, 1, 64, 3))),
        ("x", dict(x=x.long(), weight=w)),
        ("weight", dict(x=x, weight=w.long())),
        ("weight", dict(x=x, weight=w.half())),
        ("bias", dict(x=x, weight=w, bias=torch.randn(3).double())),
        ("weight", dict(x=x, weight=w.to("meta"))),
        ("scale", dict(x=x, weight=w, scale=torch.randn(3, device="meta"))),
        ("x", dict(x=torch.randn(3, 8, 8), weight=w)),
        ("bias", dict(x=x, weight=w, bias=torch.randn(4))),
        ("shift", dict(x=x, weight=w, shift=torch.randn(3, 1))),
        ("residual", dict(x=x, weight=w, residual=torch.randn(2, 3, 7, 8))),
        ("stride", dict(x=x, weight=w, stride=0)),
        ("stride", dict(x=x, weight=w, stride=(1, 0))),
        ("stride", dict(x=x, weight=w, stride=1.5)),
        ("dilation", dict(x=x, weight=w, dilation=0)),
        ("padding", dict(x=x, weight=w, padding="full")),
        ("padding", dict(x=x, weight=w, padding=-1)),
        ("activation", dict(x=x, weight=w, activation="silu")),
        ("x", dict(x=x, weight=torch.randn(3, 1, 9, 9), padding="valid")),
    ]


BAD_CASES = _bad_cases()


@pytest.mark.parametrize("backend", ["auto", "eager", *KERNEL_BACKENDS])
@pytest.mark.parametrize("argument, kwargs", BAD_CASES, ids=[f"{i}-{case[0]}" for i, case in enumerate(BAD_CASES)])
def test_bad_input(backend, argument, kwargs):
    """Bad input raises ValueError or TypeError whose message names the argument, before any backend runs."""
    with vitkern.backend(backend), pytest.raises((ValueError, TypeError), match=rf"^{argument}\b"):
        depthwise_conv2d(**kwargs)
