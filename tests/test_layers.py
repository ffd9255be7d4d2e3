"""The layers point one way: kernels at the bottom, then the CPU path and the custom ops, then the public ops, then
modules and models. Each file's vitkern imports (at any depth, lazy ones included) stay within what its layer may
use."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Layer (a folder of the repository) -> the vitkern modules its files may import.
ALLOWED = {
    "kernels": ("vitkern.kernels",),
    "vitkern/reference": ("vitkern.reference", "vitkern.kernels.contract"),
    "vitkern/cpu": ("vitkern.cpu", "vitkern.reference", "vitkern.kernels.contract", "vitkern._tuning", "vitkern._grad"),
    "vitkern/custom_ops": ("vitkern.custom_ops", "vitkern.kernels", "vitkern._grad"),
    "vitkern/ops": (
        "vitkern.ops",
        "vitkern.cpu",
        "vitkern.custom_ops",
        "vitkern.reference",
        "vitkern.kernels.contract",
        "vitkern.dispatch",
    ),
}


def _vitkern_imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args:
            if isinstance(node.args[0], ast.Constant):
                names.append(node.args[0].value)
    return [name for name in names if name == "vitkern" or name.startswith("vitkern.")]


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") or p.startswith(name + ".") for p in prefixes)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_from_below(layer):
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files, f"{layer} has no Python files"
    wrong = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in _vitkern_imports(path)
        if not _within(name, ALLOWED[layer])
    ]
    assert not wrong, "\n".join(wrong)


def test_kernels_never_import_the_ops():
    """The issue's own words: nothing under kernels/ imports from vitkern.ops."""
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        assert not [n for n in _vitkern_imports(path) if n.startswith("vitkern.ops")], path


def test_the_import_scan_sees_lazy_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import importlib\n"
        "def f():\n"
        "    from vitkern.ops.attention import rel_pos_attention\n"
        "    return importlib.import_module('vitkern.models')\n"
    )
    found = _vitkern_imports(probe)
    assert "vitkern.ops.attention" in found and "vitkern.models" in found
