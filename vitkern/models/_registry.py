"""The model registry: families register named configurations, ``create_model`` builds them."""

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


def _create(model_cls: Callable[..., nn.Module], config: dict, overrides: dict) -> nn.Module:
    """``model_cls(**config)`` with ``overrides`` replacing the configuration's values: every named configuration
    is built through here, so every override is a constructor keyword (an unknown one raises TypeError naming it)."""
    return model_cls(**{**config, **overrides})


def _load_families() -> None:
    for family in FAMILIES:
        importlib.import_module(f"vitkern.models.{family}")


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered configurations matching the glob ``pattern``."""
    _load_families()
    return sorted(name for name in _REGISTRY if fnmatch.fnmatch(name, pattern))


def create_model(name: str, num_classes: int = 1000, img_size: int | None = None, **kwargs) -> nn.Module:
    """Build the named configuration; ``kwargs`` override its constructor arguments. ``img_size`` None takes the
    configuration's native resolution."""
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    _load_families()
    if name not in _REGISTRY:
        raise ValueError(f"name: expected one of list_models(), got {name!r}")
    if img_size is not None:
        kwargs["img_size"] = img_size
    return _REGISTRY[name](num_classes=num_classes, **kwargs)
