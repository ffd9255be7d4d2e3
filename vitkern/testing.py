"""Numerics checks used by vitkern's tests (DESIGN.md, Numerics).

fp32 results are compared with the fp32 reference at rtol = atol = 1e-4. fp16/bf16 results follow flash-attention's
rule: the kernel's max error against an fp32 reference is at most ``factor`` (2) times the max error of the same-dtype
PyTorch reference against that fp32 reference, plus a small atol.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

FP32_TOL = 1e-4
LOWP_FACTOR = 2.0
LOWP_ATOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close(
    actual: torch.Tensor,
    reference_fp32: torch.Tensor,
    reference_same_dtype: torch.Tensor | None = None,
    name: str = "output",
    tol: float = FP32_TOL,
) -> None:
    """Check ``actual`` against the reference.

    For fp32 ``actual``: allclose with rtol = atol = ``tol``. For fp16/bf16: ``reference_same_dtype`` (the plain
    PyTorch reference run in that dtype) is required, and the error bound is 2x its error plus a small atol.
    """
    if actual.shape != reference_fp32.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(reference_fp32.shape)}")
    if not torch.isfinite(actual).all():
        raise AssertionError(f"{name}: non-finite values in the result")
    if actual.dtype == torch.float32 or actual.dtype == torch.float64:
        torch.testing.assert_close(
            actual, reference_fp32.to(actual.dtype), rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}"
        )
        return
    if reference_same_dtype is None:
        raise ValueError(f"{name}: a {actual.dtype} result needs the same-dtype reference for the error bound")
    err = max_error(actual, reference_fp32)
    ref_err = max_error(reference_same_dtype, reference_fp32)
    bound = LOWP_FACTOR * ref_err + LOWP_ATOL[actual.dtype]
    if err > bound:
        raise AssertionError(
            f"{name}: max error {err:.3e} against the fp32 reference exceeds {LOWP_FACTOR}x the {actual.dtype} "
            f"reference's error {ref_err:.3e} + atol {LOWP_ATOL[actual.dtype]:.0e} (= {bound:.3e})"
        )


def large_allocations(fn: Callable[[], object], threshold_bytes: int) -> list[tuple[str, int]]:
    """Run ``fn()`` on CPU tensors under the profiler and return (op name, bytes) for every op that allocated at
    least ``threshold_bytes`` itself: the check that a fused path never materialises a score matrix."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [(e.name, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage >= threshold_bytes]


def require_build(available: bool, reason: str) -> None:
    """Skip the calling test with ``reason`` when an optional build (an extension, a toolkit) is missing, as on a
    developer's machine without it; fail instead under CI (``$CI`` set), whose set-up builds everything, so a
    broken build can never pass as skipped tests."""
    if available:
        return
    import pytest

    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI's set-up builds it, so its absence is a failure)")
    pytest.skip(reason)
