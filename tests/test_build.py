"""setup.py: a build asked for an extension fails when it cannot produce it, and records the torch it built against.

Checked without compiling: setup.py run with a ``torch`` that cannot be imported, and its build_ext class around a
base class that builds nothing (or writes a placeholder file where the extension belongs).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_setup():
    spec = importlib.util.spec_from_file_location("vitkern_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_setup(tmp_path: Path, emulation: bool) -> subprocess.CompletedProcess:
    """``python setup.py --version`` where importing torch fails."""
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('torch is broken here')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITKERN_")}
    env["PYTHONPATH"] = str(tmp_path)
    if emulation:
        env["VITKERN_BUILD_EMULATION"] = "1"
    return subprocess.run(
        [sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )


def test_emulation_build_without_torch_fails_and_says_why(tmp_path):
    proc = _run_setup(tmp_path, emulation=True)
    assert proc.returncode != 0
    assert "VITKERN_BUILD_EMULATION=1 needs torch" in proc.stderr
    assert "torch is broken here" in proc.stderr and "--no-build-isolation" in proc.stderr


def test_pure_python_build_without_torch_says_so(tmp_path):
    proc = _run_setup(tmp_path, emulation=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0.1.0"
    assert "building without extensions" in proc.stderr


class _Extension:
    def __init__(self, name: str) -> None:
        self.name = name


def _fake_build(tmp_path: Path, produce: set[str]):
    """A build_ext base that 'builds' only the extensions named in ``produce`` (a placeholder file each)."""

    class Base:
        def __init__(self) -> None:
            self.extensions = [_Extension("vitkern._C"), _Extension("vitkern._emulation")]

        def get_ext_fullpath(self, name: str) -> str:
            return str(tmp_path / "vitkern" / (name.split(".")[-1] + ".so"))

        def run(self) -> None:
            (tmp_path / "vitkern").mkdir(exist_ok=True)
            for name in produce:
                Path(self.get_ext_fullpath(name)).write_bytes(b"")

    return _load_setup()._build_ext_class(Base)()


def test_build_that_does_not_produce_an_extension_fails(tmp_path):
    build = _fake_build(tmp_path, produce={"vitkern._C"})
    with pytest.raises(SystemExit, match=r"asked for vitkern\._emulation .* did not produce it"):
        build.run()
    assert not (tmp_path / "vitkern" / "_build_info.json").exists()


@pytest.mark.parametrize("archs, expected", [(None, ["8.0", "9.0"]), ("9.0", ["9.0"]), ("8.0; 9.0;", ["8.0", "9.0"])])
def test_build_records_the_torch_and_architectures_it_compiled_for(tmp_path, monkeypatch, archs, expected):
    if archs is None:
        monkeypatch.delenv("VITKERN_CUDA_ARCHS", raising=False)
    else:
        monkeypatch.setenv("VITKERN_CUDA_ARCHS", archs)
    _fake_build(tmp_path, produce={"vitkern._C", "vitkern._emulation"}).run()
    info = json.loads((tmp_path / "vitkern" / "_build_info.json").read_text())
    assert info == {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "extensions": ["vitkern._C", "vitkern._emulation"],
        "cuda_archs": expected,
    }
