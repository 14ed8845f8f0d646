"""Plain-PyTorch references of every genext op, one module per op, written for clarity and able to
run in float64.

Tests compare the kernels against these (usually on float64 copies of the inputs); benchmarks use
them, or the eager forms here, as the baseline. Library code never imports this package.
"""

from .attention_with_kvcache import attention_with_kvcache, kvcache_keys
from .contrastive import clip_loss, siglip_loss
from .flash_attention import attention_reference
from .group_norm_silu import group_norm_silu, group_norm_silu_eager
from .sampler_step import sampler_step
from .vq import vq_ema_update, vq_nearest, vq_scores

__all__ = [
    "attention_reference",
    "attention_with_kvcache",
    "clip_loss",
    "group_norm_silu",
    "group_norm_silu_eager",
    "kvcache_keys",
    "sampler_step",
    "siglip_loss",
    "vq_ema_update",
    "vq_nearest",
    "vq_scores",
]
