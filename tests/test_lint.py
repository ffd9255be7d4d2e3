"""ruff, lint and format, over the whole tree with the configuration of pyproject.toml: part of the test suite,
so CI runs it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vitkern.testing import require_build

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff(command):
    require_build(shutil.which("ruff") is not None, "ruff is not installed: pip install -r requirements-dev.txt")
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "."], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
