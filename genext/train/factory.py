"""The one place that decides which model classes the tasks train.

genext's ``AutoencoderKL`` and ``VQModel`` (``genext.models``) take diffusers' constructor
arguments and have diffusers' API, so the tasks are written against that API; this module builds
them, and falls back to diffusers' classes of the same names where genext's are absent (a genext
without them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["autoencoder_kl", "model_source", "vq_model", "vq_token_ids"]


def _classes() -> tuple[type[nn.Module], type[nn.Module], str]:
    from .. import models

    if hasattr(models, "AutoencoderKL") and hasattr(models, "VQModel"):
        return models.AutoencoderKL, models.VQModel, "genext"
    import diffusers  # genext's classes not there yet: their peer, same arguments and API

    return diffusers.AutoencoderKL, diffusers.VQModel, "diffusers"


def model_source() -> str:
    """``"genext"`` or ``"diffusers"``: whose classes :func:`autoencoder_kl` builds."""
    return _classes()[2]


def autoencoder_kl(**config: Any) -> nn.Module:
    """An ``AutoencoderKL`` from diffusers-style constructor arguments."""
    return _classes()[0](**config)


def vq_model(**config: Any) -> nn.Module:
    """A ``VQModel`` from diffusers-style constructor arguments."""
    return _classes()[1](**config)


@torch.no_grad()
def vq_token_ids(model: nn.Module, x: Tensor) -> Tensor:
    """The codebook index of every latent position of ``x``, ``(B, h, w)`` int64."""
    if hasattr(model, "encode_to_indices"):
        return model.encode_to_indices(x).reshape(len(x), *_latent_hw(model, x))
    h = model.encode(x).latents
    _, _, (_, _, indices) = model.quantize(h)
    return indices.reshape(len(x), h.shape[2], h.shape[3])


def _latent_hw(model: nn.Module, x: Tensor) -> tuple[int, int]:
    down = 2 ** (len(model.config.block_out_channels) - 1)
    return x.shape[2] // down, x.shape[3] // down
