"""The backend in force and what this process can run.

User-facing backends are ``auto``, ``eager``, ``triton`` and ``cuda``; :mod:`vitkern.dispatch` turns the backend
in force into the implementation that runs a call. This module knows which kernel families are installed and, when
one is not, says why.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import importlib.util
import json
import os
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

BACKENDS = ("auto", "eager", "triton", "cuda")
ENV_VAR = "VITKERN_BACKEND"
# Written by setup.py beside the extensions it builds: {"torch": version, "cuda": version, "extensions": [...]}.
BUILD_INFO = Path(__file__).with_name("_build_info.json")

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("vitkern_backend", default=None)


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a str, one of {BACKENDS}, got {type(name).__name__}")
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    return name


# torch.compile reads the backend once, when it traces (some torch releases cannot trace ContextVar.get): a graph
# keeps the backend it was compiled under.
@torch.compiler.assume_constant_result
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
def _load(module: str) -> ModuleType | ImportError:
    """The extension module, or the ImportError that importing it raised."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        return error


def cuda_module() -> ModuleType | None:
    """``vitkern._C`` (the nvcc build), or None where it was not built or does not load."""
    module = _load("vitkern._C")
    return None if isinstance(module, ImportError) else module


def emulation_module() -> ModuleType | None:
    """``vitkern._emulation`` (the host build of the CUDA C++ sources), or None where it was not built or does not
    load."""
    module = _load("vitkern._emulation")
    return None if isinstance(module, ImportError) else module


@torch.compiler.assume_constant_result
def _has_cuda_module() -> bool:
    """cuda_module() is not None, as a constant to torch.compile (which cannot trace the import)."""
    return cuda_module() is not None


@torch.compiler.assume_constant_result
def _has_emulation_module() -> bool:
    """emulation_module() is not None, as a constant to torch.compile (which cannot trace the import)."""
    return emulation_module() is not None


def _built_for() -> str:
    """`` (built for torch X)`` from the build record setup.py leaves beside the extensions, or ''."""
    try:
        info = json.loads(BUILD_INFO.read_text())
    except (OSError, ValueError):
        return ""
    return f" (built for torch {info.get('torch', '?')})"


def _missing_extension(module: str, how: str) -> str:
    """Why the extension ``module`` cannot be used: not built, or built but failing to load."""
    error = _load(module)
    if not isinstance(error, ImportError) or (isinstance(error, ModuleNotFoundError) and error.name == module):
        return f"needs the extension {module}, which was not built ({how}; see the README)"
    return (
        f"needs the extension {module}, which was built but does not load{_built_for()} under torch "
        f"{torch.__version__}: {error}. Rebuild it ({how})"
    )


def cuda_unavailable_reason() -> str | None:
    """Why the CUDA C++ kernels of ``vitkern._C`` cannot run CUDA tensors here, or None."""
    if _has_cuda_module():
        return None
    return _missing_extension("vitkern._C", "install with a CUDA toolkit, CUDA_HOME set and a CUDA build of torch")


def emulation_unavailable_reason() -> str | None:
    """Why the emulation build ``vitkern._emulation`` cannot run here, or None."""
    if _has_emulation_module():
        return None
    return _missing_extension("vitkern._emulation", "reinstall with VITKERN_BUILD_EMULATION=1")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
# Triton's interpreter runs kernels through numpy.
NUMPY_INSTALLED = importlib.util.find_spec("numpy") is not None


def triton_unavailable_reason() -> str | None:
    """Why the Triton kernels cannot run in this process at all, or None (the device is checked by dispatch)."""
    if not TRITON_INSTALLED:
        return "needs the triton package, which is not installed"
    if triton_interpreted() and not NUMPY_INSTALLED:
        return "runs under the Triton interpreter (TRITON_INTERPRET=1), which needs numpy: pip install numpy"
    return None


def available_backends() -> dict[str, bool]:
    """Which implementations can run in this process."""
    gpu = torch.cuda.is_available()
    return {
        "eager": True,
        "triton": triton_unavailable_reason() is None and (gpu or triton_interpreted()),
        "cuda": gpu and cuda_module() is not None,
        "cuda-emulated": emulation_module() is not None,
    }
