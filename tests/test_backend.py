"""Backend selection: the context manager, the environment variable, and clear errors instead of fallbacks."""

import os
import subprocess
import sys

import pytest
import torch

import vitkern
from vitkern import _backend
from vitkern.dispatch import Call, Implementation, Registry
from vitkern.ops import depthwise_conv as depthwise
from vitkern.testing import require_build


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


def test_selection_on_cpu_tensors():
    cpu = torch.device("cpu")
    call = Call(cpu, torch.float32)
    assert depthwise.REGISTRY.select(call, "auto").name == "cpu"
    assert depthwise.REGISTRY.select(call, "eager").name == "eager"


def test_missing_backend_raises_instead_of_falling_back(monkeypatch):
    call = Call(torch.device("cpu"), torch.float32)
    monkeypatch.setattr(_backend, "emulation_module", lambda: None)
    with pytest.raises(RuntimeError, match="VITKERN_BUILD_EMULATION"):
        depthwise.REGISTRY.select(call, "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        depthwise.REGISTRY.select(call, "triton")


def test_attention_has_no_cuda_cpp_kernel():
    q = torch.randn(1, 2, 4, 8)
    table = torch.randn(9, 2)
    require_build(
        _backend.emulation_module() is not None or torch.cuda.is_available(),
        "the emulation build is not built: reinstall with VITKERN_BUILD_EMULATION=1",
    )
    with vitkern.backend("cuda"), pytest.raises(RuntimeError, match="no CUDA C\\+\\+ attention kernel"):
        vitkern.ops.rel_pos_attention(q, q, q, table, (2, 2))


def test_error_lists_every_reason_and_the_backends_that_can(monkeypatch):
    """An explicit backend that cannot run a call names the op, each implementation's reasons, and the others."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 2, 4, 200, dtype=torch.bfloat16)
    with vitkern.backend("triton"), pytest.raises(RuntimeError) as info:
        vitkern.ops.biased_attention(q, q, q)
    message = str(info.value)
    assert message.startswith("biased_attention: backend 'triton' cannot run this call")
    for reason in ("TRITON_INTERPRET=1", "no bfloat16", "head dims up to 128, got 200"):
        assert reason in message
    assert message.endswith("Backends that can: auto, eager")


def test_registry_walks_the_auto_order_and_skips_what_cannot_run():
    always = Implementation("eager", ("cpu", "cuda"))
    refuses = Implementation("cpu", ("cpu",), limits=(lambda call: "never" if call.tokens > 4 else None,))
    registry = Registry("toy", (always, refuses), auto_order=("cpu", "eager"))
    assert registry.select(Call(torch.device("cpu"), torch.float32, {"tokens": 4}), "auto") is refuses
    assert registry.select(Call(torch.device("cpu"), torch.float32, {"tokens": 5}), "auto") is always
    with pytest.raises(RuntimeError, match="toy: backend 'triton' cannot run this call \\(no triton implementation"):
        registry.select(Call(torch.device("cpu"), torch.float32, {"tokens": 5}), "triton")
    half = Call(torch.device("cpu"), torch.float64, {"tokens": 1})
    assert "takes dtypes" in registry.get("cpu").not_supported_reasons(half)[0]


def test_extension_that_does_not_load_says_why(monkeypatch, tmp_path):
    """A build left by another torch: the error says it was built but does not load, with the import error and the
    torch it was built for."""
    error = ImportError("undefined symbol: _ZNR5torch7Library4_def")
    monkeypatch.setattr(_backend, "_load", lambda module: error)
    info = tmp_path / "_build_info.json"
    info.write_text('{"torch": "2.11.0+cu130", "cuda": "13.0", "extensions": ["vitkern._emulation"]}')
    monkeypatch.setattr(_backend, "BUILD_INFO", info)
    reason = _backend.emulation_unavailable_reason()
    assert "built but does not load (built for torch 2.11.0+cu130)" in reason
    assert "undefined symbol" in reason and torch.__version__ in reason
    assert not vitkern.available_backends()["cuda-emulated"]
