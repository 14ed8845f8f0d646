"""What the VAE and VQ-VAE tasks share: model configs per dataset and held-out evaluation."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..data import Split
from ..evaluate import digit_classifier, digit_fid, digit_fid_floor, mse
from .base import Task

__all__ = [
    "AutoencoderTask",
    "autoencoder_config",
    "batched",
    "digit_figures",
    "picture_indices",
    "psnr",
]


def autoencoder_config(data: Split, block_out_channels: tuple[int, ...]) -> dict[str, Any]:
    """diffusers-style encoder/decoder arguments for ``data``'s images: one down (up) block per
    entry of ``block_out_channels``, each but the last halving the side; no attention in the
    middle block (at a 2x2 or 8x8 latent it costs more than it gives on a CPU)."""
    c, h, _ = data.image_shape
    n = len(block_out_channels)
    return {
        "in_channels": c,
        "out_channels": c,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(block_out_channels),
        "layers_per_block": 1,
        "norm_num_groups": 16,
        "sample_size": h,
        "mid_block_add_attention": False,
    }


class AutoencoderTask(Task):
    """A task whose model is a diffusers-style encoder/decoder: overriding
    ``block_out_channels`` alone also sets as many down and up blocks."""

    def configure(self, data: Split, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        cfg = super().configure(data, overrides)
        n = len(cfg["block_out_channels"])
        for key, kind in (
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ):
            if key not in (overrides or {}):
                cfg[key] = [kind] * n
        return cfg


def picture_indices(data: Split, n: int = 16) -> Tensor:
    """``n`` held-out examples for the picture grid: for digits the first of each class and then
    the next ones in order (every digit shows), for photos evenly spaced patches."""
    if data.name == "digits":
        y = data.y_test
        firsts = [int((y == d).nonzero()[0]) for d in range(10)]
        rest = [i for i in range(len(y)) if i not in firsts]
        return torch.tensor((firsts + rest)[:n])
    return torch.linspace(0, len(data.x_test) - 1, n).round().long()


@torch.no_grad()
def batched(
    fn: Callable[[Tensor], Tensor], x: Tensor, device: torch.device | None = None, batch: int = 256
) -> Tensor:
    """``fn`` applied to ``x`` in chunks moved to ``device`` (bounded memory for the held-out
    set); the result on the CPU."""
    return torch.cat([fn(x[i : i + batch].to(device)).cpu() for i in range(0, len(x), batch)])


def psnr(a: Tensor, b: Tensor) -> float:
    """Peak signal-to-noise ratio in dB for images in [-1, 1] (peak-to-peak 2)."""
    return 10.0 * math.log10(4.0 / max(mse(a, b), 1e-12))


def digit_figures(recon: Tensor, data: Split) -> dict[str, float]:
    """The digit classifier's accuracy on real held-out digits and on ``recon`` (their
    reconstructions), and the Frechet distance in its feature space with its real-vs-real floor."""
    clf = digit_classifier()
    return {
        "classifier_acc_real": clf.accuracy(data.x_test, data.y_test),
        "classifier_acc_recon": clf.accuracy(recon, data.y_test),
        "fid_recon": digit_fid(recon, data.x_test, clf),
        "fid_floor_train_vs_test": digit_fid_floor(clf),
    }
