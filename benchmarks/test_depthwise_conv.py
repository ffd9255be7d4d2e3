"""vitkern.ops.depthwise_conv2d against what a user would otherwise run: F.conv2d (NCHW and channels_last) followed
by the same epilogue in plain PyTorch, forward and forward+backward.

Shapes: ConvMixer-1536/20 (9x9), ConvMixer-768/32 (7x7), the four ConvNeXt-T stages (7x7) and RepLKNet-31B's first
stage (31x31). On CUDA the full batch runs on the triton and cuda backends, and ``benchmark.extra_info`` records the
achieved GB/s and FLOP/s and their fraction of the device's peak. On CPU the ``auto`` backend (the CPU path) runs
against F.conv2d with a batch of one and at most 768 channels (16 for the 31x31 layer), so the whole file stays
within a few minutes on two cores.

Run: ``pytest benchmarks/test_depthwise_conv.py`` (``--benchmark-min-rounds=3`` for a short run).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import vitkern
from vitkern.ops.depthwise_conv import depthwise_conv2d

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
CPU_BATCH = 1
# Peak DRAM bandwidth (GB/s) and fp32 non-tensor-core FLOP/s of the GPUs these kernels target, by name prefix.
DEVICE_PEAKS = {
    "NVIDIA H200": (4800e9, 67e12),
    "NVIDIA H100 80GB HBM3": (3350e9, 67e12),
    "NVIDIA H100 PCIe": (2000e9, 51e12),
    "NVIDIA H100": (3350e9, 67e12),
    "NVIDIA A100-SXM4-80GB": (2039e9, 19.5e12),
    "NVIDIA A100-SXM4-40GB": (1555e9, 19.5e12),
    "NVIDIA A100 80GB PCIe": (1935e9, 19.5e12),
    "NVIDIA A100-PCIE-40GB": (1555e9, 19.5e12),
}


@dataclass(frozen=True)
class Shape:
    """One depthwise layer of a source model: batch, channels, square map size, square kernel, epilogue kind."""

    name: str
    batch: int
    channels: int
    size: int
    kernel: int
    convmixer_epilogue: bool  # GELU, folded BatchNorm and residual (ConvMixer); else bias only (ConvNeXt, RepLKNet)
    cpu_channels: int  # channels of the CPU run (batch CPU_BATCH), small enough for a short run on two cores


SHAPES = [
    Shape("convmixer_1536_20", 64, 1536, 32, 9, True, 256),
    Shape("convmixer_768_32", 64, 768, 32, 7, True, 256),
    Shape("convnext_t_stage1", 64, 96, 56, 7, False, 96),
    Shape("convnext_t_stage2", 64, 192, 28, 7, False, 192),
    Shape("convnext_t_stage3", 64, 384, 14, 7, False, 384),
    Shape("convnext_t_stage4", 64, 768, 7, 7, False, 768),
    Shape("replknet_31b_stage1", 64, 128, 56, 31, False, 16),
]
SHAPES_BY_NAME = {shape.name: shape for shape in SHAPES}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
IMPLS = ["torch_conv2d"] + (["triton", "cuda"] if ON_GPU else ["auto"])
DTYPES = [torch.float32, torch.bfloat16] if ON_GPU else [torch.float32]


def make_inputs(shape: Shape, layout: torch.memory_format, dtype: torch.dtype, requires_grad: bool) -> dict:
    batch, c = (shape.batch, shape.channels) if ON_GPU else (CPU_BATCH, shape.cpu_channels)
    k = shape.kernel
    x = torch.randn(batch, c, shape.size, shape.size, device=DEVICE).to(dtype=dtype, memory_format=layout)
    tensors = {
        "x": x,
        "weight": torch.randn(c, 1, k, k, device=DEVICE, dtype=dtype) / k,
        "bias": torch.randn(c, device=DEVICE, dtype=dtype),
    }
    if shape.convmixer_epilogue:
        tensors["scale"] = torch.randn(c, device=DEVICE, dtype=dtype)
        tensors["shift"] = torch.randn(c, device=DEVICE, dtype=dtype)
        tensors["residual"] = torch.randn_like(x)
    return {name: t.requires_grad_(requires_grad) for name, t in tensors.items()}


def _torch_block(x, weight, bias, scale=None, shift=None, residual=None):
    """F.conv2d and the epilogue as separate PyTorch ops."""
    y = F.conv2d(x, weight, bias, padding="same", groups=x.shape[1])
    if scale is None:
        return y
    return F.gelu(y) * scale[None, :, None, None] + shift[None, :, None, None] + residual


def _vitkern_block(x, weight, bias, scale=None, shift=None, residual=None):
    activation = None if scale is None else "gelu"
    return depthwise_conv2d(x, weight, bias, activation=activation, scale=scale, shift=shift, residual=residual)


def _traffic(shape: Shape, tensors: dict, backward: bool) -> tuple[float, float]:
    """(bytes, FLOPs) a fused implementation cannot avoid: every tensor read and written once; 2 FLOPs per tap
    and output for the convolution, three times that with the backward (dx and dweight)."""
    x = tensors["x"]
    size = x.numel() * x.element_size()
    feature_maps = 2 + (1 if "residual" in tensors else 0)  # x, y (and residual)
    if backward:
        feature_maps += 3  # dy in, x again for dweight, dx out
    flops = 2.0 * x.numel() * shape.kernel**2 * (3 if backward else 1)
    return float(feature_maps * size), flops


def _record_gpu_figures(benchmark, shape: Shape, tensors: dict, backward: bool) -> None:
    if not ON_GPU or benchmark.stats is None:
        return
    seconds = benchmark.stats.stats.median
    nbytes, flops = _traffic(shape, tensors, backward)
    benchmark.extra_info["GB/s"] = round(nbytes / seconds / 1e9, 1)
    benchmark.extra_info["TFLOP/s"] = round(flops / seconds / 1e12, 2)
    name = torch.cuda.get_device_name()
    peaks = next((v for prefix, v in DEVICE_PEAKS.items() if name.startswith(prefix)), None)
    if peaks is not None:
        benchmark.extra_info["bandwidth_of_peak"] = round(nbytes / seconds / peaks[0], 3)
        benchmark.extra_info["flops_of_peak"] = round(flops / seconds / peaks[1], 3)


def make_runner(impl: str, tensors: dict, backward: bool) -> Callable[[], None]:
    """One timed step: the block on ``impl`` (``torch_conv2d`` is the plain PyTorch block), and with ``backward``
    the gradients of every input; synchronised on CUDA."""
    block = _torch_block if impl == "torch_conv2d" else _vitkern_block
    backend = "auto" if impl == "torch_conv2d" else impl
    grads = list(tensors.values())
    sync = torch.cuda.synchronize if ON_GPU else (lambda: None)

    def run():
        with vitkern.backend(backend):
            y = block(**tensors)
            if backward:
                torch.autograd.grad(y, grads, torch.ones_like(y))
        sync()

    return run


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape_name", list(SHAPES_BY_NAME))
def test_depthwise_conv2d(benchmark, shape_name, impl, layout, backward, dtype):
    """Times one implementation; the group puts it beside the other implementations of the same case."""
    shape = SHAPES_BY_NAME[shape_name]
    benchmark.group = f"{shape.name}-{layout}-{'fwd_bwd' if backward else 'fwd'}-{str(dtype).removeprefix('torch.')}"
    tensors = make_inputs(shape, LAYOUTS[layout], dtype, backward)
    run = make_runner(impl, tensors, backward)
    run()
    benchmark(run)
    benchmark.extra_info["shape"] = "x".join(map(str, tensors["x"].shape)) + f" k{shape.kernel}"
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if ON_GPU else "cpu"
    _record_gpu_figures(benchmark, shape, tensors, backward)
