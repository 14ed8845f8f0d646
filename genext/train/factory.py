"""The one place that decides which model classes the tasks train: genext's own
(:class:`genext.models.AutoencoderKL`, :class:`genext.models.VQModel`), which take diffusers'
constructor arguments and have diffusers' API, so the tasks read like diffusers code."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..models import AutoencoderKL, VQModel

__all__ = ["autoencoder_kl", "vq_model", "vq_token_ids"]


def autoencoder_kl(**config: Any) -> AutoencoderKL:
    """An ``AutoencoderKL`` from diffusers-style constructor arguments."""
    return AutoencoderKL(**config)


def vq_model(**config: Any) -> VQModel:
    """A ``VQModel`` from diffusers-style constructor arguments."""
    return VQModel(**config)


@torch.no_grad()
def vq_token_ids(model: nn.Module, x: Tensor) -> Tensor:
    """The codebook index of every latent position of ``x``, ``(B, h, w)`` int64."""
    return model.encode_to_indices(x)
