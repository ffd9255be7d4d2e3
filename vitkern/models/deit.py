"""DeiT: data-efficient image transformers and distillation through attention (Touvron et al. 2021).

A ViT with a class token (and, distilled, a distillation token whose own head learns from a teacher), trained with
:class:`DistillationLoss`. Parameter counts of the named configurations (DeiT paper, facebookresearch/deit):
deit_tiny 5.7M, deit_small 22.1M, deit_base 86.6M, deit_tiny_distilled 5.9M.

Departures from lucidrains/vit-pytorch (``vit_pytorch/distill.py``: ``DistillableViT``, ``DistillWrapper``),
following the paper and its code (facebookresearch/deit ``models.py``, ``losses.py``):

- the distillation token sits right after the class token and has its own position embedding (vit-pytorch appends
  it last, without one), and it belongs to the model rather than to the loss wrapper;
- both tokens share the final LayerNorm and each has a Linear head, ``head`` and ``head_dist`` as in timm's
  ``deit.py`` (vit-pytorch's heads are LayerNorm + Linear);
- qkv projections have biases and LayerNorms use eps 1e-6, as in the DeiT code;
- hard distillation compares the distillation head with the teacher's argmax (vit-pytorch uses the class head
  there, which would not train the distillation token);
- :class:`DistillationLoss` holds the teacher and takes the student's outputs, as the DeiT code's loss does,
  rather than wrapping the student as ``DistillWrapper`` does; the soft term is vit-pytorch's batch-mean KL
  (the DeiT code divides the summed KL by the number of logits instead).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitkern.models._layers import VisionTransformer
from vitkern.models._registry import _create, register_model


class DeiT(VisionTransformer):
    """Vision transformer with a class token and, when ``distilled``, a distillation token.

    Input (B, in_chans, img_size, img_size). ``forward`` returns (B, num_classes) logits; a distilled model in
    training mode returns the pair (class-head logits, distillation-head logits) for :class:`DistillationLoss`
    and in eval mode their average, as the DeiT code does. The other keywords are :class:`VisionTransformer`'s
    (DeiT-B by default).
    """

    def __init__(self, distilled: bool = False, **kwargs) -> None:
        super().__init__(distilled=distilled, **kwargs)
        self.init_weights()


class DistillationLoss(nn.Module):
    """DeiT's distillation objective, as vit-pytorch's ``DistillWrapper`` computes it:
    ``(1 - alpha) * CE(class_logits, labels) + alpha * distill_loss``.

    - soft (``hard=False``): ``T^2 * KL(softmax(teacher / T) || softmax(distill / T))``, averaged over the batch;
    - hard: ``CE(distill, argmax(teacher))``; the paper's hard distillation is alpha = 0.5.

    The teacher runs under ``torch.no_grad()`` on the same images. ``outputs`` is a distilled model's pair
    (class logits, distillation logits), each (B, num_classes); a single (B, num_classes) tensor serves as both.
    labels: (B,) class indices.
    """

    def __init__(self, teacher: nn.Module, temperature: float = 1.0, alpha: float = 0.5, hard: bool = False) -> None:
        super().__init__()
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher: expected an nn.Module, got {type(teacher).__name__}")
        if not temperature > 0:
            raise ValueError(f"temperature: expected a positive number, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha: expected a weight in [0, 1], got {alpha}")
        self.teacher = teacher
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.hard = hard

    def forward(
        self,
        images: torch.Tensor,
        outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """Scalar loss for ``images`` (B, C, H, W), the student's ``outputs`` and ``labels`` (B,)."""
        if isinstance(outputs, (tuple, list)):
            if len(outputs) != 2:
                raise ValueError(f"outputs: expected (class logits, distillation logits), got {len(outputs)} tensors")
            logits, distill_logits = outputs
        else:
            logits = distill_logits = outputs
        if logits.shape != distill_logits.shape or logits.ndim != 2:
            raise ValueError(
                f"outputs: expected two (batch, classes) logit tensors of one shape, got {tuple(logits.shape)} "
                f"and {tuple(distill_logits.shape)}"
            )
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        if teacher_logits.shape != distill_logits.shape:
            raise ValueError(
                f"teacher: expected logits of shape {tuple(distill_logits.shape)} like the student's, got "
                f"{tuple(teacher_logits.shape)}"
            )
        label_loss = F.cross_entropy(logits, labels)
        if self.hard:
            distill_loss = F.cross_entropy(distill_logits, teacher_logits.argmax(dim=-1))
        else:
            t = self.temperature
            distill_loss = F.kl_div(
                F.log_softmax(distill_logits / t, dim=-1),
                F.log_softmax(teacher_logits / t, dim=-1),
                reduction="batchmean",
                log_target=True,
            ) * (t * t)
        return label_loss * (1.0 - self.alpha) + distill_loss * self.alpha


def _deit(embed_dim: int, num_heads: int, overrides: dict, distilled: bool = False) -> DeiT:
    config = dict(patch_size=16, embed_dim=embed_dim, depth=12, num_heads=num_heads, distilled=distilled)
    return _create(DeiT, config, overrides)


@register_model
def deit_tiny_patch16_224(**kwargs) -> DeiT:
    """DeiT-Ti: 192 wide, 12 blocks of 3 heads (5.7M parameters in the paper)."""
    return _deit(192, 3, kwargs)


@register_model
def deit_small_patch16_224(**kwargs) -> DeiT:
    """DeiT-S: 384 wide, 12 blocks of 6 heads (22.1M parameters in the paper)."""
    return _deit(384, 6, kwargs)


@register_model
def deit_base_patch16_224(**kwargs) -> DeiT:
    """DeiT-B: 768 wide, 12 blocks of 12 heads (86.6M parameters in the paper)."""
    return _deit(768, 12, kwargs)


@register_model
def deit_tiny_distilled_patch16_224(**kwargs) -> DeiT:
    """DeiT-Ti with the distillation token and head (5.9M parameters in the paper)."""
    return _deit(192, 3, kwargs, distilled=True)
