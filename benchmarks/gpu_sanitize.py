"""Every CUDA C++ kernel of vitkern at small shapes, forward and backward: the program the GPU check runs under
``compute-sanitizer --tool memcheck`` and ``--tool racecheck`` (benchmarks/gpu_check.py, stage 4).

Runs the public ops on backend ``cuda``: CUDA tensors on a GPU, the emulation build on CPU tensors otherwise (the
GPU check's dry run, which runs this file without a sanitizer). Shapes are small so that the sanitizer's slowdown
stays within its time cap, but they cover what changes a kernel's path: both memory formats, kernel sizes below and
above a tile, stride 2 and dilation 2, the full epilogue, and a row width that is not a multiple of the vector
width. An op that has no CUDA C++ kernel (its error says "has no CUDA C++") is skipped and named.
Exit status 0 unless an op raised something else.

``python benchmarks/gpu_sanitize.py``
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable

import torch

import vitkern

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = (torch.float32, torch.bfloat16) if DEVICE.type == "cuda" else (torch.float32,)
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
# (channels, height, width, kernel, stride, dilation)
CONV_CASES = ((8, 13, 11, 3, 1, 1), (5, 16, 16, 7, 2, 1), (3, 12, 9, 9, 1, 2), (4, 9, 10, 31, 1, 1))
# (kind, heads, side, head_dim, value_dim, stride)
ATTENTION_CASES = (("rel_pos", 2, 7, 32, 32, 1), ("levit", 2, 7, 16, 32, 1), ("levit", 2, 7, 16, 64, 2))


def conv_runs() -> list[tuple[str, Callable[[], None]]]:
    runs = []
    for (c, h, w, k, stride, dilation), (layout, fmt), dtype, epilogue in itertools.product(
        CONV_CASES, LAYOUTS.items(), DTYPES, (False, True)
    ):

        def run(c=c, h=h, w=w, k=k, stride=stride, dilation=dilation, fmt=fmt, dtype=dtype, epilogue=epilogue):
            x = torch.randn(2, c, h, w, device=DEVICE, dtype=dtype).contiguous(memory_format=fmt)
            weight = torch.randn(c, 1, k, k, device=DEVICE, dtype=dtype)
            vectors = [torch.randn(c, device=DEVICE, dtype=dtype) for _ in range(3)]
            leaves = [x, weight, *vectors] if epilogue else [x, weight, vectors[0]]
            for t in leaves:
                t.requires_grad_()
            extra = {"activation": "gelu", "scale": vectors[1], "shift": vectors[2]} if epilogue else {}
            y = vitkern.ops.depthwise_conv2d(x, weight, vectors[0], stride=stride, dilation=dilation, **extra)
            torch.autograd.grad(y, leaves, torch.randn_like(y))

        name = f"depthwise_conv2d c{c} {h}x{w} k{k} s{stride} d{dilation} {layout} {dtype} epilogue={epilogue}"
        runs.append((name, run))
    return runs


def attention_runs() -> list[tuple[str, Callable[[], None]]]:
    runs = []
    for (kind, heads, side, d, dv, stride), dtype in itertools.product(ATTENTION_CASES, DTYPES):

        def run(kind=kind, heads=heads, side=side, d=d, dv=dv, stride=stride, dtype=dtype):
            queries = ((side - 1) // stride + 1) ** 2
            q = torch.randn(2, heads, queries, d, device=DEVICE, dtype=dtype, requires_grad=True)
            k = torch.randn(2, heads, side * side, d, device=DEVICE, dtype=dtype, requires_grad=True)
            v = torch.randn(2, heads, side * side, dv, device=DEVICE, dtype=dtype, requires_grad=True)
            if kind == "rel_pos":
                bias = torch.randn((2 * side - 1) ** 2, heads, device=DEVICE, dtype=dtype, requires_grad=True)
                out = vitkern.ops.rel_pos_attention(q, k, v, bias, (side, side))
            else:
                bias = torch.randn(heads, side * side, device=DEVICE, dtype=dtype, requires_grad=True)
                out = vitkern.ops.levit_attention(q, k, v, bias, side, stride)
            torch.autograd.grad(out, [q, k, v, bias], torch.randn_like(out))

        runs.append((f"{kind}_attention {heads}h side{side} d{d}/{dv} s{stride} {dtype}", run))
    return runs


def main() -> int:
    torch.manual_seed(0)
    failed = 0
    with vitkern.backend("cuda"):
        for name, run in conv_runs() + attention_runs():
            try:
                run()
            except RuntimeError as error:
                reason = str(error).splitlines()[0]
                if "has no CUDA C++" in reason:
                    print(f"skipped {name}: {reason}")
                    continue
                print(f"FAILED {name}: {reason}")
                failed += 1
                continue
            print(f"ran {name}")
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
