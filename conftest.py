"""Test and benchmark set-up: on a machine without a CUDA device, run Triton kernels under its interpreter.

TRITON_INTERPRET must be set before triton is first imported, so this runs at conftest import time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import vitkern  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
