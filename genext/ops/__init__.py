"""genext ops: one module per op, each with its public function, the devices and dtypes its kernels
serve, its fake (meta) kernel and its autograd.

The diffusion sampler step (genext/ops/_sampler_step.py) is a kernel contract, not an API: use a
scheduler of :mod:`genext.samplers`.
"""

from __future__ import annotations

from . import _sampler_step  # noqa: F401  (registers the sampler step's fake kernels)
from ._common import KERNELS, served_dtypes, softmax_scale
from .attention_with_kvcache import attention_with_kvcache
from .contrastive import clip_loss, siglip_loss
from .flash_attention import flash_attention, flash_attention_varlen
from .group_norm_silu import group_norm_silu
from .vq import vq_ema_update, vq_nearest

__all__ = [
    "KERNELS",
    "attention_with_kvcache",
    "clip_loss",
    "flash_attention",
    "flash_attention_varlen",
    "group_norm_silu",
    "served_dtypes",
    "siglip_loss",
    "softmax_scale",
    "vq_ema_update",
    "vq_nearest",
]
