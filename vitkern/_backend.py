"""Backend selection: which implementation an op call runs.

User-facing backends are ``auto``, ``eager``, ``triton`` and ``cuda``. An op resolves the user's choice and the
device of its inputs to a concrete implementation:

======================  ==============================================================
``eager``               the plain-PyTorch reference in :mod:`vitkern.reference`
``cpu``                 the tuned CPU path (``auto`` on CPU tensors), plain PyTorch ops
``triton``              the Triton kernels (on CPU tensors: under ``TRITON_INTERPRET=1``)
``cuda``                the CUDA C++ kernels of ``vitkern._C`` on CUDA tensors
``cuda-emulated``       the same CUDA C++ sources built for the host (``vitkern._emulation``)
======================  ==============================================================
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import os
from collections.abc import Iterator
from functools import cache
from types import ModuleType

import torch

BACKENDS = ("auto", "eager", "triton", "cuda")
ENV_VAR = "VITKERN_BACKEND"

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("vitkern_backend", default=None)


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a str, one of {BACKENDS}, got {type(name).__name__}")
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    return name


def current_backend() -> str:
    """The backend in force: the innermost ``vitkern.backend(...)``, else ``$VITKERN_BACKEND``, else ``auto``."""
    name = _current.get()
    if name is None:
        name = os.environ.get(ENV_VAR, "auto")
        if name not in BACKENDS:
            raise ValueError(f"{ENV_VAR}: expected one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Run the ops inside the ``with`` block on backend ``name`` ("auto", "eager", "triton" or "cuda")."""
    token = _current.set(_check_name(name))
    try:
        yield
    finally:
        _current.reset(token)


@cache
def _load(module: str) -> ModuleType | None:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def cuda_module() -> ModuleType | None:
    """``vitkern._C`` (the nvcc build), or None where it was not built."""
    return _load("vitkern._C")


def emulation_module() -> ModuleType | None:
    """``vitkern._emulation`` (the host build of the CUDA C++ sources), or None where it was not built."""
    return _load("vitkern._emulation")


@torch.compiler.assume_constant_result
def _has_cuda_module() -> bool:
    """cuda_module() is not None, as a constant to torch.compile (which cannot trace the import)."""
    return cuda_module() is not None


@torch.compiler.assume_constant_result
def _has_emulation_module() -> bool:
    """emulation_module() is not None, as a constant to torch.compile (which cannot trace the import)."""
    return emulation_module() is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def available_backends() -> dict[str, bool]:
    """Which implementations can run in this process."""
    gpu = torch.cuda.is_available()
    return {
        "eager": True,
        "triton": TRITON_INSTALLED and (gpu or triton_interpreted()),
        "cuda": gpu and cuda_module() is not None,
        "cuda-emulated": emulation_module() is not None,
    }


def resolve(op: str, device: torch.device, auto_gpu: str = "triton", requested: str | None = None) -> str:
    """The concrete implementation that runs ``op`` on ``device``.

    ``auto_gpu`` is the op's preferred kernel family on CUDA tensors under ``auto``. Raises RuntimeError naming what
    is missing when the requested backend cannot run here; it never falls back silently.
    """
    name = current_backend() if requested is None else _check_name(requested)
    on_gpu = device.type == "cuda"
    if name == "eager":
        return "eager"
    if name == "auto":
        if not on_gpu:
            return "cpu"
        if auto_gpu == "cuda" and _has_cuda_module():
            return "cuda"
        if TRITON_INSTALLED:
            return "triton"
        return "eager"
    if name == "triton":
        if not TRITON_INSTALLED:
            raise RuntimeError(f"{op}: backend 'triton' needs the triton package, which is not installed")
        if not on_gpu and not triton_interpreted():
            raise RuntimeError(
                f"{op}: backend 'triton' on {device.type} tensors needs the Triton interpreter: set "
                "TRITON_INTERPRET=1 before triton is imported, or pass CUDA tensors"
            )
        return "triton"
    # name == "cuda"
    if on_gpu:
        if not _has_cuda_module():
            raise RuntimeError(
                f"{op}: backend 'cuda' needs the vitkern._C extension, which was not built (install with a CUDA "
                "toolkit, CUDA_HOME set and a CUDA build of torch; see the README)"
            )
        return "cuda"
    if not _has_emulation_module():
        raise RuntimeError(
            f"{op}: backend 'cuda' on {device.type} tensors needs the emulation build vitkern._emulation, which was "
            "not built (reinstall with VITKERN_BUILD_EMULATION=1; see the README)"
        )
    return "cuda-emulated"
