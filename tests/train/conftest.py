"""Tiny model configs for the training tests: a few thousand parameters, a few steps."""

from __future__ import annotations

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("safetensors")

_TINY = {
    "vae": {"block_out_channels": [8, 8], "norm_num_groups": 4, "latent_channels": 2},
    "vqvae": {
        "block_out_channels": [8, 8],
        "norm_num_groups": 4,
        "latent_channels": 2,
        "vq_embed_dim": 2,
        "num_vq_embeddings": 16,
    },
    "gan": {"nz": 8, "ngf": 4, "ndf": 4},  # DCGAN: 64x64 (its layers are fixed)
    "cgan": {"z_dim": 8, "base_channels": 8, "image_size": 8},
    "stylegan": {
        "z_dim": 8,
        "w_dim": 8,
        "image_size": 8,
        "mapping_layers": 1,
        "channel_base": 32,
        "channel_max": 8,
    },
}


@pytest.fixture
def tiny() -> dict[str, dict]:
    """Per task, the model arguments (over the task's own) that make the model tiny."""
    return {k: dict(v) for k, v in _TINY.items()}
