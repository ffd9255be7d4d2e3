"""Attention with learned position biases against what a user would otherwise run (`pytest benchmarks`).

For each model shape, forward and forward+backward:

* ``reference``: :mod:`vitkern.reference` (gather the (heads, Nq, Nk) bias, matmul, add, softmax, matmul), as the
  seed code and timm do;
* ``sdpa``: ``F.scaled_dot_product_attention`` with the gathered bias materialised as its float mask;
* ``flex`` (CUDA only): compiled FlexAttention with the table gathered in ``score_mod``;
* ``vitkern``: the public op on backend ``auto``: the per-shape choice of kernel on CUDA tensors, the CPU path on
  CPU tensors;
* ``triton``, ``cuda`` (CUDA only): the public op on the Triton kernels and on the CUDA C++ kernels (the Triton
  interpreter and the emulation build are correctness tools, not speed measurements, so they are not benchmarked).

Memory and throughput go to ``extra_info``. On CUDA ``peak_bytes`` is ``torch.cuda.max_memory_allocated`` above the
inputs during one call, and ``tflop_per_s`` / ``fraction_of_peak`` give the achieved FLOP/s. On CPU torch has no
allocator statistics, so ``allocated_bytes`` (the total size of the new storages every aten op returned during one
call) and ``largest_alloc_bytes`` (the largest of them) are recorded by a dispatch mode instead; they count
plain-PyTorch allocations. ``scores_bytes`` is the size of one (B, heads, Nq, Nk) score tensor, for comparison.
Timings are never asserted.

Each implementation's output is checked against the reference once before its forward timing. On CPU the batches
are small so that the file runs in a few minutes on 2 cores.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import vitkern
from vitkern import reference
from vitkern.testing import assert_close
from vitkern.tools.cases import AttentionCase

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if ON_CUDA else torch.float32
ROUNDS = 20 if ON_CUDA else 5
WARMUP_ROUNDS = 5 if ON_CUDA else 1
# Dense bf16 tensor-core peak by compute capability (A100, H100/H200 SXM), for the fraction-of-peak column.
PEAK_BF16_FLOPS = {(8, 0): 312e12, (9, 0): 989e12}
# FLOPs of forward+backward over forward, flash-attention's accounting (the backward does 2.5x the forward's).
BACKWARD_FLOP_FACTOR = 3.5
# On CPU the 4096-token case takes seconds per call: fewer rounds keep the file within a few minutes.
LONG_TOKENS = 4096
LONG_ROUNDS_CPU = 2


def _batch(gpu: int, cpu: int) -> int:
    return gpu if ON_CUDA else cpu


CASES = [
    # CoAtNet-0 at 224: stage 3 is 14x14 with 384 channels (12 heads of 32), stage 4 7x7 with 768 (24 heads).
    AttentionCase("coatnet0_s3", "rel_pos", _batch(64, 2), 12, 14, 32, 32),
    AttentionCase("coatnet0_s4", "rel_pos", _batch(64, 4), 24, 7, 32, 32),
    # Swin-T stage 1: 7x7 windows, 3 heads of 32, 64 windows per 224 image.
    AttentionCase("swin_t_windows", "rel_pos", _batch(64 * 64, 64), 3, 7, 32, 32),
    # LeViT-128S: key dim 16, values 2x (4x in shrink attention), resolutions 14, 7, 4; heads 4, 6, 8.
    AttentionCase("levit128s_s1", "levit", _batch(128, 4), 4, 14, 16, 32),
    AttentionCase("levit128s_shrink1", "levit", _batch(128, 4), 8, 14, 16, 64, stride=2),
    AttentionCase("levit128s_s2", "levit", _batch(128, 8), 6, 7, 16, 32),
    AttentionCase("levit128s_shrink2", "levit", _batch(128, 8), 16, 7, 16, 64, stride=2),
    AttentionCase("levit128s_s3", "levit", _batch(128, 16), 8, 4, 16, 32),
    # LeViT-256: key dim 32, heads 4, 6, 8 at resolutions 14, 7, 4.
    AttentionCase("levit256_s1", "levit", _batch(128, 4), 4, 14, 32, 64),
    AttentionCase("levit256_shrink1", "levit", _batch(128, 4), 8, 14, 32, 128, stride=2),
    AttentionCase("levit256_s2", "levit", _batch(128, 8), 6, 7, 32, 64),
    AttentionCase("levit256_s3", "levit", _batch(128, 16), 8, 4, 32, 64),
    # One long sequence: a 64x64 window, 4096 tokens.
    AttentionCase("long_4096", "rel_pos", _batch(4, 1), _batch(8, 1), 64, 64, 64),
]
IMPLS = ("reference", "sdpa", "flex", "vitkern", "triton", "cuda")
GPU_ONLY_IMPLS = ("triton", "cuda")
MODES = ("forward", "forward_backward")


def make_inputs(case: AttentionCase) -> tuple[torch.Tensor, ...]:
    """q, k, v and the learned bias parameter: a table ((2W-1)^2, heads) or LeViT biases (heads, R*R)."""

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=DEVICE, dtype=DTYPE).requires_grad_()

    q = rand(case.batch, case.heads, case.queries, case.head_dim)
    k = rand(case.batch, case.heads, case.keys, case.head_dim)
    v = rand(case.batch, case.heads, case.keys, case.value_dim)
    if case.kind == "rel_pos":
        bias = rand((2 * case.side - 1) ** 2, case.heads)
    else:
        bias = rand(case.heads, case.keys)
    return q, k, v, bias


def gathered_bias(case: AttentionCase, bias: torch.Tensor) -> torch.Tensor:
    """(heads, Nq, Nk), gathered by indexing as the seed code and timm do."""
    if case.kind == "rel_pos":
        return reference.rel_pos_bias(bias, (case.side, case.side))
    return reference.levit_bias(bias, case.side, case.stride)


def flex_score_mod(case: AttentionCase, bias: torch.Tensor):
    """A ``score_mod`` that reads the learned bias parameter from token coordinates, as a FlexAttention user would."""
    side, stride = case.side, case.stride
    q_side = (side - 1) // stride + 1
    if case.kind == "rel_pos":

        def score_mod(score, b, h, q_idx, kv_idx):
            dy = q_idx // side - kv_idx // side + side - 1
            dx = q_idx % side - kv_idx % side + side - 1
            return score + bias[dy * (2 * side - 1) + dx, h]

    else:

        def score_mod(score, b, h, q_idx, kv_idx):
            dy = (q_idx // q_side * stride - kv_idx // side).abs()
            dx = (q_idx % q_side * stride - kv_idx % side).abs()
            return score + bias[h, dy * side + dx]

    return score_mod


def check_output(case: AttentionCase, fn, inputs: tuple[torch.Tensor, ...]) -> None:
    """The benchmarked callable computes the op: its output against the reference (DESIGN.md tolerances)."""
    with torch.no_grad():
        actual = fn(*inputs)
        reference_fn = attention_fn(case, "reference")
        expected = reference_fn(*(t.float() for t in inputs))
        same_dtype = None if DTYPE == torch.float32 else reference_fn(*inputs)
    assert_close(actual, expected, same_dtype)


def attention_fn(case: AttentionCase, impl: str):
    """A callable (q, k, v, bias) -> out for one implementation."""
    if impl == "reference":
        if case.kind == "rel_pos":
            return lambda q, k, v, t: reference.rel_pos_attention(q, k, v, t, (case.side, case.side))
        return lambda q, k, v, b: reference.levit_attention(q, k, v, b, case.side, case.stride)
    if impl == "sdpa":
        return lambda q, k, v, b: F.scaled_dot_product_attention(q, k, v, attn_mask=gathered_bias(case, b))
    if impl == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)
        return lambda q, k, v, b: compiled(q, k, v, score_mod=flex_score_mod(case, b))
    if case.kind == "rel_pos":
        op = lambda q, k, v, t: vitkern.ops.rel_pos_attention(q, k, v, t, (case.side, case.side))  # noqa: E731
    else:
        op = lambda q, k, v, b: vitkern.ops.levit_attention(q, k, v, b, case.side, case.stride)  # noqa: E731
    if impl == "vitkern":
        return op

    def on_backend(*inputs):
        with vitkern.backend(impl):
            return op(*inputs)

    return on_backend


class AllocationRecorder(TorchDispatchMode):
    """Sizes of the new storages that aten ops return (on CPU, where torch keeps no allocator statistics)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[int] = set()
        self.total = 0
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage.data_ptr() not in self.seen:
                    self.seen.add(storage.data_ptr())
                    self.total += storage.nbytes()
                    self.largest = max(self.largest, storage.nbytes())
        return out


def record_memory(benchmark, run, inputs: tuple[torch.Tensor, ...]) -> None:
    """One extra call of ``run`` with its memory use written to ``benchmark.extra_info``."""
    if ON_CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        benchmark.extra_info["peak_bytes"] = torch.cuda.max_memory_allocated() - base
        return
    recorder = AllocationRecorder()
    recorder.seen.update(t.untyped_storage().data_ptr() for t in inputs)
    with recorder:
        run()
    benchmark.extra_info["allocated_bytes"] = recorder.total
    benchmark.extra_info["largest_alloc_bytes"] = recorder.largest
    benchmark.extra_info["memory_note"] = "CPU: sizes of the storages aten ops returned, not an allocator peak"


def record_flops(benchmark, case: AttentionCase, backward: bool) -> None:
    """Achieved FLOP/s from the fastest round, and its fraction of the device's peak (CUDA only)."""
    flops = 2 * case.batch * case.heads * case.queries * case.keys * (case.head_dim + case.value_dim)
    if backward:
        flops *= BACKWARD_FLOP_FACTOR
    achieved = flops / benchmark.stats.stats.min
    benchmark.extra_info["tflop_per_s"] = achieved / 1e12
    peak = PEAK_BF16_FLOPS.get(torch.cuda.get_device_capability(DEVICE))
    if peak is not None:
        benchmark.extra_info["fraction_of_peak"] = achieved / peak


def make_runner(fn, inputs: tuple[torch.Tensor, ...], grad_out: torch.Tensor, backward: bool):
    """One timed step: ``fn(q, k, v, bias)``, and with ``backward`` the gradients of all four; synchronised on CUDA."""

    def run() -> None:
        for t in inputs:
            t.grad = None
        with torch.set_grad_enabled(backward):
            out = fn(*inputs)
            if backward:
                out.backward(grad_out)
        if ON_CUDA:
            torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_attention(benchmark, case: AttentionCase, impl: str, mode: str) -> None:
    if impl == "flex" and not ON_CUDA:
        pytest.skip("FlexAttention runs on CUDA only here: torch has no FlexAttention backward on CPU")
    if impl in GPU_ONLY_IMPLS and not ON_CUDA:
        pytest.skip(f"{impl} on CPU tensors runs through a correctness tool (interpreter or emulation), not timed")
    q, k, v, bias = make_inputs(case)
    fn = attention_fn(case, impl)
    backward = mode == "forward_backward"
    grad_out = torch.randn(case.batch, case.heads, case.queries, case.value_dim, device=DEVICE, dtype=DTYPE)

    run = make_runner(fn, (q, k, v, bias), grad_out, backward)

    if not backward:
        with vitkern.backend("auto"):
            check_output(case, fn, (q, k, v, bias))

    benchmark.group = f"{case.name}-{mode}"
    benchmark.extra_info.update(
        batch=case.batch,
        heads=case.heads,
        queries=case.queries,
        keys=case.keys,
        head_dim=case.head_dim,
        value_dim=case.value_dim,
        dtype=str(DTYPE),
        device=DEVICE.type,
        scores_bytes=case.batch * case.heads * case.queries * case.keys * q.element_size(),
    )
    long_on_cpu = case.keys >= LONG_TOKENS and not ON_CUDA
    rounds, warmup_rounds = (LONG_ROUNDS_CPU, 0) if long_on_cpu else (ROUNDS, WARMUP_ROUNDS)
    with vitkern.backend("auto"):
        benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
        record_memory(benchmark, run, (q, k, v, bias, grad_out))
    if ON_CUDA:
        record_flops(benchmark, case, backward)
