"""Vector quantisation by brute force in plain PyTorch: the reference of ``genext.ops.vq_nearest``
and ``genext.ops.vq_ema_update``. The (N, K) score matrix is materialised: for tests and small
benchmarks (``torch.cdist(z, codebook).argmin(1)`` is the eager baseline users write)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["vq_ema_update", "vq_nearest", "vq_scores"]


def vq_scores(z: Tensor, codebook: Tensor, metric: str = "l2") -> Tensor:
    """(N, K) scores of every row of z (N, D) against every code (K, D), smaller is nearer, in z's
    dtype (pass float64 copies for a reference): the squared Euclidean distance for ``"l2"``, the
    negated cosine similarity for ``"cosine"`` (rows normalised; a zero row stays zero)."""
    if metric == "cosine":
        return -(F.normalize(z, dim=-1) @ F.normalize(codebook, dim=-1).T)
    return ((z[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)


def vq_nearest(z: Tensor, codebook: Tensor, metric: str = "l2") -> tuple[Tensor, Tensor]:
    """What ``genext.ops.vq_nearest`` returns, for z (N, D): (indices (N,) int64, the smallest
    score's index with ties to the smallest index; distances (N,): the Euclidean distance for
    ``"l2"``, ``1 - cosine similarity`` for ``"cosine"``). A NaN score never wins: the smallest
    of the other scores does (an infinite one only when nothing finite is left), and a row whose
    every score is NaN gets index 0 and distance NaN."""
    s = vq_scores(z, codebook, metric)
    nan = s.isnan()
    key = s.masked_fill(nan, float("inf"))
    best = key.min(-1, keepdim=True).values
    winners = (key == best) & ~nan
    idx = torch.where(winners.any(-1), winners.to(torch.int8).argmax(-1), 0)
    picked = s.gather(-1, idx[:, None])[:, 0]
    dist = picked.sqrt() if metric == "l2" else 1 + picked
    return idx, dist


def vq_ema_update(indices: Tensor, z: Tensor, num_codes: int) -> tuple[Tensor, Tensor]:
    """What ``genext.ops.vq_ema_update`` returns, in z's dtype: (counts (K,), the number of rows
    of z (N, D) assigned to each code; sums (K, D), their sum)."""
    idx = indices.reshape(-1).long()
    zf = z.reshape(-1, z.shape[-1])
    counts = torch.bincount(idx, minlength=num_codes).to(z.dtype)
    sums = torch.zeros(num_codes, zf.shape[1], dtype=z.dtype, device=z.device).index_add_(
        0, idx, zf
    )
    return counts, sums
