"""DeiT: data-efficient image transformers and distillation through attention (Touvron et al. 2021).

A ViT with a class token (and, distilled, a distillation token whose own head learns from a teacher), trained with
:class:`DistillationLoss`. Parameter counts of the named configurations (DeiT paper, facebookresearch/deit):
deit_tiny 5.7M, deit_small 22.1M, deit_base 86.6M, deit_tiny_distilled 5.9M.

Departures from the seed (vit-pytorch's ``DistillableViT`` / ``DistillWrapper``), following the paper and its code:

- the distillation token sits right after the class token and has its own position embedding (the seed appends it
  last, without one), and it belongs to the model rather than to the loss wrapper;
- both tokens share the final LayerNorm and each has a Linear head (the seed's heads are LayerNorm + Linear);
- qkv projections have biases and LayerNorms use eps 1e-6, as in the DeiT code;
- hard distillation compares the distillation head with the teacher's argmax (the seed's text uses the class
  head there, which would not train the distillation token);
- :class:`DistillationLoss` holds the teacher and takes the student's outputs, as the DeiT code's loss does,
  rather than wrapping the student as the seed's ``DistillWrapper``; the soft term is the seed's batch-mean KL
  (the DeiT code divides the summed KL by the number of logits instead).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitkern.models import register_model
from vitkern.models._layers import (
    INIT_STD,
    PatchEmbed,
    block_stack,
    init_weights,
    layer_norm,
    make_head,
)


class DeiT(nn.Module):
    """Vision transformer with a class token and, when ``distilled``, a distillation token.

    Input (B, in_chans, img_size, img_size). ``forward`` returns (B, num_classes) logits; a distilled model in
    training mode returns the pair (class-head logits, distillation-head logits) for :class:`DistillationLoss`
    and in eval mode their average, as the DeiT code does.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        distilled: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.distilled = distilled
        self.num_prefix_tokens = 2 if distilled else 1
        self.to_patch_embedding = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.to_patch_embedding.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.distillation_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.pos_embedding = nn.Parameter(torch.zeros(1, num_patches + self.num_prefix_tokens, embed_dim))
        self.dropout = nn.Dropout(drop_rate)
        self.blocks = block_stack(
            depth,
            drop_path_rate,
            embed_dim,
            num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            drop=drop_rate,
            attn_drop=attn_drop_rate,
            norm_layer=layer_norm,
        )
        self.norm = layer_norm(embed_dim)
        self.mlp_head = make_head(embed_dim, num_classes)
        self.distill_mlp = make_head(embed_dim, num_classes) if distilled else None
        nn.init.trunc_normal_(self.pos_embedding, std=INIT_STD)
        nn.init.trunc_normal_(self.cls_token, std=INIT_STD)
        if distilled:
            nn.init.trunc_normal_(self.distillation_token, std=INIT_STD)
        self.apply(init_weights)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head(s) with fresh ones for ``num_classes`` classes (0: no head, features out)."""
        self.num_classes = num_classes
        self.mlp_head = make_head(self.embed_dim, num_classes)
        if self.distilled:
            self.distill_mlp = make_head(self.embed_dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, prefix tokens + patches, embed_dim) normalised tokens."""
        x = self.to_patch_embedding(x)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.distilled:
            prefix.append(self.distillation_token.expand(x.shape[0], -1, -1))
        x = torch.cat((*prefix, x), dim=1) + self.pos_embedding
        x = self.blocks(self.dropout(x))
        return self.norm(x)

    def forward_head(
        self, x: torch.Tensor, pre_logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, N, embed_dim) -> logits (B, num_classes), or with ``pre_logits`` the class token
        (B, embed_dim), averaged with the distillation token in a distilled model; see the class docstring for the
        distilled model's pair of logits."""
        if pre_logits:
            return (x[:, 0] + x[:, 1]) / 2 if self.distilled else x[:, 0]
        logits = self.mlp_head(x[:, 0])
        if not self.distilled:
            return logits
        distill_logits = self.distill_mlp(x[:, 1])
        if self.training:
            return logits, distill_logits
        return (logits + distill_logits) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.forward_head(self.forward_features(x))


class DistillationLoss(nn.Module):
    """DeiT's distillation objective, as the seed's ``DistillWrapper``:
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


def _deit(num_classes: int, distilled: bool = False, **kwargs) -> DeiT:
    return DeiT(num_classes=num_classes, distilled=distilled, **kwargs)


@register_model
def deit_tiny_patch16_224(num_classes: int = 1000, **kwargs) -> DeiT:
    """DeiT-Ti: 192 wide, 12 blocks of 3 heads (5.7M parameters in the paper)."""
    return _deit(num_classes, **{"patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": 3, **kwargs})


@register_model
def deit_small_patch16_224(num_classes: int = 1000, **kwargs) -> DeiT:
    """DeiT-S: 384 wide, 12 blocks of 6 heads (22.1M parameters in the paper)."""
    return _deit(num_classes, **{"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6, **kwargs})


@register_model
def deit_base_patch16_224(num_classes: int = 1000, **kwargs) -> DeiT:
    """DeiT-B: 768 wide, 12 blocks of 12 heads (86.6M parameters in the paper)."""
    return _deit(num_classes, **{"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, **kwargs})


@register_model
def deit_tiny_distilled_patch16_224(num_classes: int = 1000, **kwargs) -> DeiT:
    """DeiT-Ti with the distillation token and head (5.9M parameters in the paper)."""
    return _deit(
        num_classes, distilled=True, **{"patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": 3, **kwargs}
    )
