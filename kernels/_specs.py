"""What the kernel report compiles: every Triton kernel in every config its launcher can pick.

Each kernel module defines ``report_specs() -> list[KernelSpec]`` listing, for fp32, fp16 and bf16, every
combination of compile-time flags and block sizes that its launcher can launch with. ``vitkern.tools.kernel_report``
compiles each spec for sm_80 and sm_90 without a GPU and reads registers, spills and shared memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
REPORT_DTYPES = tuple(TRITON_DTYPES)


@dataclass(frozen=True)
class KernelSpec:
    """One launchable config of one ``@triton.jit`` kernel.

    signature: every non-constexpr argument name -> Triton type ("*fp16", "i32", "fp32", ...), in argument order.
    constexprs: every ``tl.constexpr`` argument name -> value.
    maxnreg: the launch's register limit per thread (Triton's ``maxnreg`` option), None for ptxas's own choice.
    aligned: integer arguments compiled as multiples of 16, as a launch specialises them on such values.
    """

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 2
    maxnreg: int | None = None
    aligned: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
