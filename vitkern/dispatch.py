"""How an op chooses the implementation that runs a call.

Each op keeps a small registry: its implementations, each of which states what it supports and, asked about one
call, returns every reason it cannot run it (an empty list: it can). The backend in force
(:func:`vitkern.backend`) names the implementations to consider:

=============  =========================================================================================
``eager``      ``eager``: the plain-PyTorch reference in :mod:`vitkern.reference`
``triton``     ``triton``: the Triton kernels (on CPU tensors under ``TRITON_INTERPRET=1``)
``cuda``       ``cuda``: the CUDA C++ kernels of ``vitkern._C`` on CUDA tensors, or ``cuda-emulated``: the
               same sources built for the host (``vitkern._emulation``) on CPU tensors
``auto``       the op's own priority list: ``cpu`` (the tuned CPU path) for CPU tensors, the GPU kernels for
               CUDA tensors, the reference where no kernel takes the call
=============  =========================================================================================

The first implementation without reasons runs. When none can, the error lists every implementation's reasons and
the backends that could run the call instead; nothing falls back to a backend the user did not ask for. The
approach follows xformers' ``xformers/ops/fmha/dispatch.py`` and its ``not_supported_reasons``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vitkern._backend import (
    BACKENDS,
    cuda_unavailable_reason,
    current_backend,
    emulation_unavailable_reason,
    triton_interpreted,
    triton_unavailable_reason,
)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The user-facing backend each implementation belongs to.
BACKEND_OF = {"eager": "eager", "cpu": "auto", "triton": "triton", "cuda": "cuda", "cuda-emulated": "cuda"}


@dataclass(frozen=True)
class Call:
    """What an implementation needs to know about one call: the device and dtype of its tensors and the op's own
    features (kernel size, bias mode, head dim, ...), by name."""

    device: torch.device
    dtype: torch.dtype
    features: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.features[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass(frozen=True)
class Implementation:
    """One way to run an op.

    name: "eager", "cpu", "triton", "cuda" or "cuda-emulated".
    devices: the device types its tensors may live on.
    dtypes: the storage dtypes it takes.
    limits: op-specific checks, each ``call -> reason or None``.
    """

    name: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    limits: tuple[Callable[[Call], str | None], ...] = ()

    @property
    def backend(self) -> str:
        return BACKEND_OF[self.name]

    def not_supported_reasons(self, call: Call) -> list[str]:
        """Every reason this implementation cannot run ``call`` in this process; empty when it can."""
        reasons = []
        if call.device.type not in self.devices:
            reasons.append(f"runs on {'/'.join(self.devices)} tensors, got {call.device.type} tensors")
        if call.dtype not in self.dtypes:
            reasons.append(f"takes dtypes {', '.join(str(d) for d in self.dtypes)}, got {call.dtype}")
        missing = _unavailable(self.name, call.device)
        if missing is not None:
            reasons.append(missing)
        for limit in self.limits:
            reason = limit(call)
            if reason is not None:
                reasons.append(reason)
        return reasons


def _unavailable(name: str, device: torch.device) -> str | None:
    """Why this process cannot run the implementation family ``name`` on ``device`` at all, or None."""
    if name == "triton":
        missing = triton_unavailable_reason()
        if missing is None and device.type != "cuda" and not triton_interpreted():
            missing = (
                f"on {device.type} tensors needs the Triton interpreter: set TRITON_INTERPRET=1 before triton is "
                "imported, or pass CUDA tensors"
            )
        return missing
    if name == "cuda":
        return cuda_unavailable_reason()
    if name == "cuda-emulated":
        return emulation_unavailable_reason()
    return None


def interpreter_has_no_bf16(call: Call) -> str | None:
    """A limit of the Triton kernels on CPU tensors, which run under the interpreter: it has no bfloat16."""
    if call.device.type == "cpu" and call.dtype == torch.bfloat16:
        return "the Triton interpreter has no bfloat16 (CPU tensors run under it)"
    return None


@dataclass(frozen=True)
class Registry:
    """The implementations of one op and the order ``auto`` tries them in.

    auto_order: names in priority order, or a function of the call returning them (a per-shape rule).
    """

    op: str
    implementations: tuple[Implementation, ...]
    auto_order: Sequence[str] | Callable[[Call], Sequence[str]] = ("cpu", "cuda", "triton", "eager")

    def __post_init__(self):
        object.__setattr__(self, "_by_name", {impl.name: impl for impl in self.implementations})

    def get(self, name: str) -> Implementation:
        return self._by_name[name]

    def candidates(self, backend: str, call: Call) -> list[Implementation]:
        """The implementations ``backend`` considers for ``call``, in the order they are tried."""
        if backend == "auto":
            order = self.auto_order(call) if callable(self.auto_order) else self.auto_order
            return [self._by_name[name] for name in order if name in self._by_name]
        named = [impl for impl in self.implementations if impl.backend == backend]
        # "cuda" names two implementations, one per device type: consider the one for the call's device.
        return [impl for impl in named if call.device.type in impl.devices] or named

    def select(self, call: Call, backend: str | None = None) -> Implementation:
        """The implementation that runs ``call`` on ``backend`` (default: the backend in force).

        Raises RuntimeError with every candidate's reasons and the backends that could run the call instead.
        """
        backend = current_backend() if backend is None else backend
        candidates = self.candidates(backend, call)
        for impl in candidates:
            if not impl.not_supported_reasons(call):
                return impl
        raise RuntimeError(self._explain(backend, candidates, call))

    def _explain(self, backend: str, candidates: list[Implementation], call: Call) -> str:
        if candidates:
            why = "; ".join(f"{impl.name}: {', '.join(impl.not_supported_reasons(call))}" for impl in candidates)
        else:
            why = f"no {backend} implementation"
        able = [
            other
            for other in BACKENDS
            if other != backend and any(not impl.not_supported_reasons(call) for impl in self.candidates(other, call))
        ]
        return (
            f"{call.features.get('op', self.op)}: backend {backend!r} cannot run this call ({why}). "
            f"Backends that can: {', '.join(able) or 'none in this process'}"
        )
