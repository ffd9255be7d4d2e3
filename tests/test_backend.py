"""Backend selection: the context manager, the environment variable, and clear errors instead of fallbacks."""

import os
import subprocess
import sys

import pytest
import torch

import vitkern
from vitkern import _backend


def test_default_is_auto_and_context_nests():
    assert vitkern.current_backend() == os.environ.get("VITKERN_BACKEND", "auto")
    with vitkern.backend("eager"):
        assert vitkern.current_backend() == "eager"
        with vitkern.backend("triton"):
            assert vitkern.current_backend() == "triton"
        assert vitkern.current_backend() == "eager"


def test_context_restores_after_exception():
    before = vitkern.current_backend()
    with pytest.raises(KeyError):
        with vitkern.backend("eager"):
            raise KeyError("boom")
    assert vitkern.current_backend() == before


@pytest.mark.parametrize("bad, error", [("gpu", ValueError), ("", ValueError), (3, TypeError)])
def test_unknown_backend_names_the_argument(bad, error):
    with pytest.raises(error, match="backend"):
        with vitkern.backend(bad):
            pass


def test_environment_variable_selects_backend():
    code = "import vitkern; print(vitkern.current_backend())"
    env = {**os.environ, "VITKERN_BACKEND": "eager"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "eager"


def test_environment_variable_rejects_unknown_name(monkeypatch):
    monkeypatch.setenv("VITKERN_BACKEND", "fastest")
    with pytest.raises(ValueError, match="VITKERN_BACKEND"):
        vitkern.current_backend()


def test_available_backends_reports_every_family():
    available = vitkern.available_backends()
    assert set(available) == {"eager", "triton", "cuda", "cuda-emulated"}
    assert available["eager"] is True
    assert available["cuda"] == (torch.cuda.is_available() and _backend.cuda_module() is not None)
    assert available["cuda-emulated"] == (_backend.emulation_module() is not None)


def test_resolution_on_cpu_tensors():
    cpu = torch.device("cpu")
    assert _backend.resolve("op", cpu, requested="auto") == "cpu"
    assert _backend.resolve("op", cpu, requested="eager") == "eager"


def test_missing_backend_raises_instead_of_falling_back(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(_backend, "emulation_module", lambda: None)
    with pytest.raises(RuntimeError, match="VITKERN_BUILD_EMULATION"):
        _backend.resolve("depthwise_conv2d", cpu, requested="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        _backend.resolve("depthwise_conv2d", cpu, requested="triton")


def test_attention_has_no_cuda_cpp_kernel():
    q = torch.randn(1, 2, 4, 8)
    table = torch.randn(9, 2)
    if _backend.emulation_module() is None and not torch.cuda.is_available():
        pytest.fail("the emulation build is part of the test set-up (VITKERN_BUILD_EMULATION=1)")
    with vitkern.backend("cuda"), pytest.raises(RuntimeError, match="no CUDA C\\+\\+ attention kernel"):
        vitkern.ops.rel_pos_attention(q, q, q, table, (2, 2))
