"""vitkern: fused GPU kernels for vision-transformer-family models."""

from vitkern._backend import available_backends, backend, current_backend
from vitkern import models, nn, ops, reference
from vitkern.patching import patch, patched, unpatch

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "backend",
    "current_backend",
    "models",
    "nn",
    "ops",
    "patch",
    "patched",
    "reference",
    "unpatch",
    "__version__",
]
