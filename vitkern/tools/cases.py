"""The attention shapes that the benchmarks (``benchmarks/test_attention.py``) and the perf model
(:mod:`vitkern.tools.perf_model`) share. A leaf module: plain dataclasses, no torch or triton imports."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionCase:
    """One attention shape: ``kind`` "rel_pos" (a window of side x side tokens) or "levit" (a key grid of
    resolution R = side, queries on the ``stride`` grid); q and k are ``head_dim`` wide, v ``value_dim``."""

    name: str
    kind: str
    batch: int
    heads: int
    side: int
    head_dim: int
    value_dim: int
    stride: int = 1

    @property
    def queries(self) -> int:
        return ((self.side - 1) // self.stride + 1) ** 2

    @property
    def keys(self) -> int:
        return self.side * self.side
