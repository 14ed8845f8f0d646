"""Functional forms of genext's modules (the ops with PyTorch-style names)."""
from ..ops.group_norm_silu import group_norm_silu

__all__ = ["group_norm_silu"]
