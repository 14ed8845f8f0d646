"""``genext train vqvae``: a vector-quantised autoencoder (``VQModel``) on digits or photos.

Loss: mean squared reconstruction error plus the quantiser's own codebook and commitment loss
(``quantize(h)``'s second output). A learned codebook starts far from the encoder's outputs and
most codes would never be chosen, so every ``restart_every`` steps the codes no batch chose since
the last restart are set to encoder outputs drawn at random from the current batch (dead-code
restart, as in Jukebox and vector-quantize-pytorch). Across DDP ranks the usage counts are summed
and rank 0's new codebook is broadcast, so every rank keeps the same codebook.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import Split
from ..evaluate import codebook_stats, mse
from ..factory import vq_model, vq_token_ids
from ._autoencoder import (
    AutoencoderTask,
    autoencoder_config,
    batched,
    digit_figures,
    picture_indices,
    psnr,
)
from .base import TaskDefaults, register

__all__ = ["VQObjective", "VQVAETask"]

RESTART_EVERY = 25


class VQObjective(nn.Module):
    """``forward(x, y, generator)``: the VQ-VAE loss of batch ``x``; ``after_step(generator)``
    restarts unused codes every ``restart_every`` steps (``counts`` holds the usage since the
    last restart and is saved with the checkpoint)."""

    def __init__(self, model: nn.Module, restart_every: int = RESTART_EVERY) -> None:
        super().__init__()
        self.model = model
        self.restart_every = restart_every
        codebook = self.codebook()
        self.register_buffer("counts", torch.zeros(len(codebook), device=codebook.device))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self._latents: Tensor | None = None
        self._batch_counts: Tensor | None = None

    def codebook(self) -> Tensor:
        """The codebook ``(K, D)`` (``quantize.embedding.weight``, diffusers' layout)."""
        return self.model.quantize.embedding.weight

    def forward(
        self, x: Tensor, y: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Tensor]]:
        h = self.model.encode(x).latents
        z_q, q_loss, (_, _, indices) = self.model.quantize(h)
        recon = self.model.decode(z_q, force_not_quantize=True).sample
        rec = F.mse_loss(recon, x)
        # kept for after_step: this batch's latents (channels-last rows) and code counts
        self._latents = h.detach().permute(0, 2, 3, 1).reshape(-1, h.shape[1])
        self._batch_counts = torch.bincount(indices.reshape(-1), minlength=len(self.counts))
        return rec + q_loss, {"mse": rec.detach(), "vq_loss": q_loss.detach()}

    @torch.no_grad()
    def after_step(self, generator: torch.Generator) -> None:
        counts = self._batch_counts.to(self.counts.dtype)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:
            dist.all_reduce(counts)
        self.counts += counts
        self.steps += 1
        if int(self.steps) % self.restart_every != 0:
            return
        dead = (self.counts == 0).nonzero().flatten()
        if len(dead) and (not distributed or dist.get_rank() == 0):
            rows = torch.randint(len(self._latents), (len(dead),), generator=generator)
            self.codebook()[dead] = self._latents[rows.to(self._latents.device)]
        if distributed:
            dist.broadcast(self.codebook().data, src=0)
        self.counts.zero_()


@register
class VQVAETask(AutoencoderTask):
    name = "vqvae"
    datasets = ("digits", "photos")
    defaults = {
        "digits": TaskDefaults(steps=600, batch_size=64, lr=2e-3),
        "photos": TaskDefaults(steps=300, batch_size=16, lr=1e-3, size=32),
    }

    def model_config(self, data: Split) -> dict[str, Any]:
        if data.name == "digits":
            # 8x8 -> 4x4 tokens from 64 codes of 4 dimensions
            cfg = autoencoder_config(data, (32, 64))
            return cfg | {"latent_channels": 4, "vq_embed_dim": 4, "num_vq_embeddings": 64}
        cfg = autoencoder_config(data, (32, 64, 64))  # 32x32 -> 8x8 tokens
        return cfg | {"latent_channels": 8, "vq_embed_dim": 8, "num_vq_embeddings": 256}

    def build(self, config: dict[str, Any]) -> nn.Module:
        return vq_model(**config)

    def objective(self, model: nn.Module) -> nn.Module:
        return VQObjective(model)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Split) -> dict[str, float]:
        device = next(model.parameters()).device
        recon = batched(lambda x: model(x).sample, data.x_test, device)
        tokens = batched(lambda x: vq_token_ids(model, x), data.x_test, device)
        out = {
            "tokens_per_image": float(tokens[0].numel()),
            "codebook_size": float(model.config.num_vq_embeddings),
            "mse": mse(recon, data.x_test),
            "psnr_db": psnr(recon, data.x_test),
        }
        out |= codebook_stats(tokens, model.config.num_vq_embeddings)
        if data.name == "digits":
            out |= digit_figures(recon, data)
        return out

    @torch.no_grad()
    def pictures(self, model: nn.Module, data: Split, generator: torch.Generator) -> list[Tensor]:
        device = next(model.parameters()).device
        x = data.x_test[picture_indices(data)].to(device)
        return [x, model(x).sample]

    def row_titles(self) -> list[str]:
        return ["held-out", "reconstruction"]
