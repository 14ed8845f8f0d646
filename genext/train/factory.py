"""The one place that decides which model classes the tasks train: genext's own
(:class:`genext.models.AutoencoderKL`, :class:`genext.models.VQModel`), which take diffusers'
constructor arguments and have diffusers' API, so the tasks read like diffusers code. The same
for the diffusion U-Nets (:class:`genext.models.UNet2DModel`,
:class:`genext.models.UNet2DConditionModel`) and the language model
(:class:`genext.models.LlamaForCausalLM`, configured as transformers' ``LlamaConfig``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import models
from ..models import AutoencoderKL, VQModel

__all__ = ["UNET_CLASSES", "autoencoder_kl", "causal_lm", "unet", "vq_model", "vq_token_ids"]

# the UNet classes :func:`unet` builds, by diffusers' class name
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


def autoencoder_kl(**config: Any) -> AutoencoderKL:
    """An ``AutoencoderKL`` from diffusers-style constructor arguments."""
    return AutoencoderKL(**config)


def unet(class_name: str, **config: Any) -> nn.Module:
    """A diffusion UNet from diffusers-style constructor arguments: ``"UNet2DModel"`` (class
    labels through ``num_class_embeds``) or ``"UNet2DConditionModel"`` (cross-attention on
    ``encoder_hidden_states``). Either is called as ``model(sample, timestep, ...).sample``."""
    if class_name not in UNET_CLASSES:
        raise ValueError(f"unet: class_name must be one of {UNET_CLASSES}, got {class_name!r}")
    return getattr(models, class_name)(**config)


def causal_lm(**config: Any) -> nn.Module:
    """A ``LlamaForCausalLM`` from ``LlamaConfig`` fields."""
    return models.LlamaForCausalLM.from_config(config)


def vq_model(**config: Any) -> VQModel:
    """A ``VQModel`` from diffusers-style constructor arguments."""
    return VQModel(**config)


@torch.no_grad()
def vq_token_ids(model: nn.Module, x: Tensor) -> Tensor:
    """The codebook index of every latent position of ``x``, ``(B, h, w)`` int64."""
    return model.encode_to_indices(x)
