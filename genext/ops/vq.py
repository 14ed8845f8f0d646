"""VQ ops: nearest codebook entry without an N x K distance matrix, and the per-code sums of an
EMA codebook update."""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import acc_dtype, declare_kernels

__all__ = ["vq_nearest", "vq_ema_update"]

declare_kernels(
    ["vq_nearest", "vq_ema_update"],
    cpu=(torch.float32, torch.float64, torch.float16, torch.bfloat16),
    cuda=(torch.float32, torch.float16, torch.bfloat16),
)

_METRICS = ("l2", "cosine")


def vq_nearest(z: Tensor, codebook: Tensor, metric: str = "l2") -> tuple[Tensor, Tensor]:
    """Index of the nearest row of `codebook` (K, D) for every vector of z (..., D).

    metric "l2": the smallest Euclidean distance, computed as a sum of squared differences in
    fp32 (fp64 for fp64 inputs; fp16/bf16 are widened); "cosine": the largest cosine similarity
    (z and the codebook normalised, zero vectors stay zero), distance 1 - similarity. Ties go to the
    smallest index, as torch.argmin. Returns (indices int64 of shape z.shape[:-1], distances of
    that shape, float32 or float64). No N x K matrix is formed: extra memory is O(N + K*D).
    Not differentiable (the layer uses a straight-through estimator around it).
    """
    if metric not in _METRICS:
        raise ValueError(f"vq_nearest: metric must be 'l2' or 'cosine', got {metric!r}")
    if z.dim() < 1:
        raise ValueError("vq_nearest: z must have a last dimension D")
    lead = z.shape[:-1]
    idx, dist = torch.ops.genext.vq_nearest(
        z.reshape(-1, z.shape[-1]), codebook, metric == "cosine"
    )
    return idx.view(lead), dist.view(lead)


def vq_ema_update(
    indices: Tensor, z: Tensor, num_codes: int, deterministic: bool = False
) -> tuple[Tensor, Tensor]:
    """(counts (K,), sums (K, D)): how many vectors of z (..., D) each code received and their sum,
    in float32 (float64 for fp64 z), for EMA codebook learning. indices: z.shape[:-1], int64 or
    int32, each in [0, num_codes). deterministic: bit-identical sums run to run (on CUDA a
    sort-based reduction instead of atomics; the CPU is always deterministic)."""
    zf = z.reshape(-1, z.shape[-1])
    return torch.ops.genext.vq_ema_update(
        indices.reshape(-1), zf, int(num_codes), bool(deterministic)
    )


@torch.library.register_fake("genext::vq_nearest")
def _fake_nearest(z, codebook, cosine):
    torch._check(
        z.dim() == 2 and codebook.dim() == 2 and z.shape[1] == codebook.shape[1],
        lambda: "vq_nearest: z must be (N, D) and codebook (K, D)",
    )
    n = z.shape[0]
    return z.new_empty((n,), dtype=torch.int64), z.new_empty((n,), dtype=acc_dtype(z))


@torch.library.register_fake("genext::vq_ema_update")
def _fake_ema(indices, z, num_codes, deterministic):
    return (
        z.new_empty((num_codes,), dtype=acc_dtype(z)),
        z.new_empty((num_codes, z.shape[1]), dtype=acc_dtype(z)),
    )
