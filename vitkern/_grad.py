"""Whether autograd will record a call: the one question every layer asks before choosing what to save."""

from __future__ import annotations

import torch


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records a call on these tensors (None entries are absent optional arguments)."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False
