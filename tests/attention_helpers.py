"""Shared by the attention tests (tests/ops, tests/nn): tolerances and random q, k, v."""

from __future__ import annotations

import torch

# float32 and float64: absolute error bounds against float64 (values and gradients are O(1) here)
ATOL = {torch.float32: 2e-5, torch.float64: 1e-12}
ATOL_GRAD = {torch.float32: 1e-4, torch.float64: 1e-11}


def make_qkv(b, hq, hk, lq, lk, d, dtype, device, requires_grad=False):
    """Random (B, H, L, D) q, k, v (never zeros), drawn in float64 then rounded to dtype."""

    def rand(h, length):
        t = torch.randn(b, h, length, d, dtype=torch.float64).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    return rand(hq, lq), rand(hk, lk), rand(hk, lk)
