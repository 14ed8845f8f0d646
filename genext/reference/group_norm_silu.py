"""GroupNorm + SiLU in plain PyTorch: the reference of ``genext.ops.group_norm_silu`` and what
users write today (the eager and torch.compile baseline of the benchmarks)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["group_norm_silu", "group_norm_silu_eager"]


def group_norm_silu(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = "silu",
) -> Tensor:
    """silu(group_norm(x)) computed step by step in x's dtype (use float64 for a reference)."""
    n, c = x.shape[:2]
    xg = x.reshape(n, num_groups, (c // num_groups) * math.prod(x.shape[2:]))
    mean = xg.mean(dim=2, keepdim=True)
    var = (xg - mean).square().mean(dim=2, keepdim=True)  # biased, as GroupNorm uses
    z = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    if weight is not None:
        shape = (1, c) + (1,) * (x.dim() - 2)
        z = z * weight.to(x.dtype).reshape(shape) + bias.to(x.dtype).reshape(shape)
    return z * torch.sigmoid(z) if activation == "silu" else z


def group_norm_silu_eager(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = "silu",
) -> Tensor:
    """What users write today: ``F.silu(F.group_norm(...))`` (the eager and torch.compile baseline)."""
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if activation == "silu" else y
