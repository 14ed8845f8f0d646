"""``genext train vae``: a KL-regularised autoencoder (``AutoencoderKL``) on digits or photos.

Loss per image: the summed squared error of the reconstruction from a sampled latent plus
``kl_weight`` times the KL divergence of the posterior from N(0, I), averaged over the batch. The
small KL weight keeps reconstructions sharp (the latent stays informative) while still pulling the
posterior towards the prior, so decoding N(0, I) draws gives digit-like samples.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..data import Split
from ..evaluate import digit_classifier, digit_fid, mse, pca_mse, pca_reconstruct
from ..factory import autoencoder_kl
from ._autoencoder import (
    AutoencoderTask,
    autoencoder_config,
    batched,
    digit_figures,
    picture_indices,
    psnr,
)
from .base import TaskDefaults, register

__all__ = ["VAETask"]

KL_WEIGHT = 0.05


class VAEObjective(nn.Module):
    """``forward(x, y, generator)``: the VAE loss of batch ``x`` with latents drawn by ``generator``."""

    def __init__(self, model: nn.Module, kl_weight: float = KL_WEIGHT) -> None:
        super().__init__()
        self.model = model
        self.kl_weight = kl_weight

    def forward(
        self, x: Tensor, y: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Tensor]]:
        posterior = self.model.encode(x).latent_dist
        recon = self.model.decode(posterior.sample(generator=generator)).sample
        rec = (recon - x).pow(2).flatten(1).sum(1).mean()
        kl = posterior.kl().mean()
        logs = {"mse": rec.detach() / x[0].numel(), "kl": kl.detach()}
        return rec + self.kl_weight * kl, logs


@register
class VAETask(AutoencoderTask):
    name = "vae"
    datasets = ("digits", "photos")
    defaults = {
        "digits": TaskDefaults(steps=800, batch_size=64, lr=2e-3),
        "photos": TaskDefaults(steps=300, batch_size=16, lr=1e-3, size=32),
    }

    def model_config(self, data: Split) -> dict[str, Any]:
        if data.name == "digits":
            # 8x8 -> 2x2 x 2 channels: 8 latent dimensions, a real bottleneck for 64 pixels
            # (with 64 latent dimensions PCA would reconstruct 8x8 digits exactly)
            return autoencoder_config(data, (32, 64, 64)) | {"latent_channels": 2}
        return autoencoder_config(data, (32, 64, 64)) | {"latent_channels": 4}

    def build(self, config: dict[str, Any]) -> nn.Module:
        return autoencoder_kl(**config)

    def objective(self, model: nn.Module) -> nn.Module:
        return VAEObjective(model)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Split) -> dict[str, float]:
        device = next(model.parameters()).device
        latents = batched(lambda x: model.encode(x).latent_dist.mode(), data.x_test, device)
        recon = batched(lambda z: model.decode(z).sample, latents, device)
        k = latents[0].numel()
        out = {
            "latent_dims": float(k),
            "mse": mse(recon, data.x_test),
            "pca_mse": pca_mse(data.x_train, data.x_test, k),
            "psnr_db": psnr(recon, data.x_test),
        }
        if data.name == "digits":
            out |= digit_figures(recon, data)
            pca = pca_reconstruct(data.x_train, data.x_test, k).float()
            out["classifier_acc_pca"] = digit_classifier().accuracy(pca, data.y_test)
            gen = torch.Generator().manual_seed(0)
            z = torch.randn(len(data.x_test), *latents.shape[1:], generator=gen)
            samples = batched(lambda z: model.decode(z).sample, z, device)
            out["fid_prior_samples"] = digit_fid(samples, data.x_test, digit_classifier())
        return out

    @torch.no_grad()
    def pictures(self, model: nn.Module, data: Split, generator: torch.Generator) -> list[Tensor]:
        device = next(model.parameters()).device
        x = data.x_test[picture_indices(data)].to(device)
        z = model.encode(x).latent_dist.mode()
        prior = torch.randn(z.shape, generator=generator).to(device)
        return [x, model.decode(z).sample, model.decode(prior).sample]

    def row_titles(self) -> list[str]:
        return ["held-out", "reconstruction", "sample from N(0, I)"]
