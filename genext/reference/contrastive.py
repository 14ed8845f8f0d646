"""The contrastive losses as users write them, with the whole N x N logits: the reference of
``genext.ops.clip_loss`` and ``genext.ops.siglip_loss`` (pass float64 copies) and the eager
baseline of the benchmarks. Same formulas as open_clip's ``ClipLoss`` and ``SigLipLoss``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["clip_loss", "siglip_loss"]


def _logits(
    image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor | None
) -> Tensor:
    logits = logit_scale * image_features @ text_features.T
    return logits + logit_bias if logit_bias is not None else logits


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor | None = None,
    labels_offset: int = 0,
) -> Tensor:
    """CLIP's InfoNCE on logits = logit_scale * I T^T (+ logit_bias), in the features' dtype.
    Square with labels_offset 0: the mean of both directions; otherwise image -> text only, with
    row i's label i + offset."""
    logits = _logits(image_features, text_features, logit_scale, logit_bias)
    labels = torch.arange(image_features.shape[0], device=logits.device) + labels_offset
    if image_features.shape[0] == text_features.shape[0] and labels_offset == 0:
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    return F.cross_entropy(logits, labels)


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor | None,
    negative_only: bool = False,
) -> Tensor:
    """SigLIP's loss: -sum_ij log sigmoid(z_ij * L_ij) / Ni with L = logit_scale * I T^T +
    logit_bias, z = +1 where i == j and -1 elsewhere (all -1 when ``negative_only``)."""
    logits = _logits(image_features, text_features, logit_scale, logit_bias)
    z = -torch.ones_like(logits)
    if not negative_only:
        z += 2 * torch.eye(*logits.shape, dtype=logits.dtype, device=logits.device)
    return -F.logsigmoid(z * logits).sum() / image_features.shape[0]
