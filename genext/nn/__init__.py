"""Drop-in modules backed by genext ops: ``GroupNormSiLU`` (for ``nn.GroupNorm`` + ``nn.SiLU``),
``VectorQuantizer``, the generation ``KVCache``, and functional forms in :mod:`genext.nn.functional`
(among them a drop-in ``scaled_dot_product_attention``)."""

from . import functional
from .group_norm_silu import GroupNormSiLU
from .kvcache import KVCache
from .vector_quantizer import VectorQuantizer

__all__ = ["GroupNormSiLU", "KVCache", "VectorQuantizer", "functional"]
