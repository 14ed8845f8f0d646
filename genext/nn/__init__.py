"""Drop-in modules backed by genext ops."""
from . import functional
from .group_norm_silu import GroupNormSiLU

__all__ = ["GroupNormSiLU", "functional"]
