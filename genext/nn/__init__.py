"""Drop-in modules backed by genext ops."""
from . import functional
from .group_norm_silu import GroupNormSiLU
from .vector_quantizer import VectorQuantizer

__all__ = ["GroupNormSiLU", "VectorQuantizer", "functional"]
