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
}


@pytest.fixture
def tiny() -> dict[str, dict]:
    """Model arguments per task, over the task's own, that make the model tiny."""
    return {k: dict(v) for k, v in _TINY.items()}
