"""The model set of vitkern, timm-style: ``create_model(name, **kwargs)`` and ``list_models()``.

One module per family registers its named configurations with :func:`register_model`. Every model runs on the
current backend (:func:`vitkern.backend`): ``eager`` is the plain-PyTorch reference path, the others route the hot
spots to the fused ops; the parameters are the same on every backend.
"""

from __future__ import annotations

from vitkern.models._registry import FAMILIES, create_model, list_models, register_model
from vitkern.models.deit import DistillationLoss

__all__ = ["DistillationLoss", "FAMILIES", "create_model", "list_models", "register_model"]
