"""The model set of vitkern, timm-style: ``create_model(name, **kwargs)`` and ``list_models()``.

One module per family registers its named configurations with :func:`register_model`. Every model runs on the
current backend (:func:`vitkern.backend`): ``eager`` is the plain-PyTorch reference path, the others route the hot
spots to the fused ops; the parameters are the same on every backend.
"""

from __future__ import annotations

import fnmatch
import importlib
from collections.abc import Callable

import torch.nn as nn

FAMILIES = ("coatnet", "convmixer", "deepvit", "deit", "cait", "t2t_vit", "crossvit", "pit", "levit", "cvt")

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model constructor under its function name."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _REGISTRY[fn.__name__] = fn
    return fn


def _load_families() -> None:
    for family in FAMILIES:
        importlib.import_module(f"vitkern.models.{family}")


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered configurations matching the glob ``pattern``."""
    _load_families()
    return sorted(name for name in _REGISTRY if fnmatch.fnmatch(name, pattern))


def create_model(name: str, num_classes: int = 1000, img_size: int | None = None, **kwargs) -> nn.Module:
    """Build the named configuration. ``img_size`` None takes the configuration's native resolution."""
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    _load_families()
    if name not in _REGISTRY:
        raise ValueError(f"name: expected one of list_models(), got {name!r}")
    if img_size is not None:
        kwargs["img_size"] = img_size
    return _REGISTRY[name](num_classes=num_classes, **kwargs)


from vitkern.models.deit import DistillationLoss  # noqa: E402  (deit.py imports register_model from above)

__all__ = ["DistillationLoss", "FAMILIES", "create_model", "list_models", "register_model"]
