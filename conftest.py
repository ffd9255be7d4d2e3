"""Test and benchmark set-up: on a machine without a CUDA device, run Triton kernels under its interpreter.

TRITON_INTERPRET must be set before triton is first imported, so this runs at conftest import time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import vitkern  # noqa: E402
from vitkern.testing import require_build  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# What a test parametrized with ``backend`` needs built, on this machine's device.
_BUILD_NEEDED = {
    "cuda": (
        "vitkern._C" if DEVICE.type == "cuda" else "vitkern._emulation",
        "reinstall with VITKERN_BUILD_EMULATION=1 (README)" if DEVICE.type == "cpu" else "build with a CUDA toolkit",
    ),
}


@pytest.fixture(autouse=True)
def _backend_builds(request):
    """A test on backend "cuda" needs the extension that runs it; without it the test is skipped with the reason
    (a failure under CI: see vitkern.testing.require_build)."""
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend") if callspec is not None else None
    if backend in _BUILD_NEEDED:
        module, how = _BUILD_NEEDED[backend]
        built = vitkern.available_backends()["cuda" if DEVICE.type == "cuda" else "cuda-emulated"]
        require_build(built, f"backend 'cuda' needs {module}, which is not built here: {how}")


# hypothesis profiles for tests/test_fuzz.py: "ci" (the default) draws a fixed, bounded set of examples so that a run
# is reproducible and short; `pytest --hypothesis-profile=long` draws many more, from a fresh seed each run.
settings.register_profile(
    "ci",
    max_examples=30,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long",
    max_examples=1000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci")
