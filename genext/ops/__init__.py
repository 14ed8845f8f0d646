"""genext ops: one module per op, each with its public function, fake (meta) kernel and autograd."""
from __future__ import annotations

import torch

from .attention_with_kvcache import attention_with_kvcache
from .contrastive import clip_loss, siglip_loss
from .flash_attention import flash_attention, flash_attention_varlen
from .group_norm_silu import group_norm_silu
from .sampler_step import sampler_step
from .vq import vq_ema_update, vq_nearest

# Which devices and dtypes have kernels, per op; build_info() confirms each against the dispatcher.
_GN = {
    "cpu": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}
_FA = {
    "cpu": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),  # fp16/bf16 fast, fp32 a plain kernel
}
_SAMPLER = {
    "cpu": (torch.float32, torch.float16, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}
_VQ = {
    "cpu": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}
KERNELS: dict[str, dict[str, tuple[torch.dtype, ...]]] = {
    "group_norm_silu": _GN,
    "group_norm_silu_backward": _GN,
    "flash_attention_forward": _FA,
    "flash_attention_backward": _FA,
    "attention_with_kvcache": {
        "cpu": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
        "cuda": (torch.float16, torch.bfloat16, torch.float32),
    },
    # sample dtypes; arithmetic is fp32 for all of them
    "sampler_step": _SAMPLER,
    "sampler_step_out": _SAMPLER,
    "vq_nearest": _VQ,
    "vq_ema_update": _VQ,
    "tiled_lse": _VQ,
    "tiled_lse_backward": _VQ,
    "tiled_softplus_sum": _VQ,
    "tiled_softplus_sum_backward": _VQ,
}

__all__ = ["attention_with_kvcache", "clip_loss", "siglip_loss", "flash_attention", "flash_attention_varlen", "group_norm_silu",
           "sampler_step", "vq_ema_update", "vq_nearest", "KERNELS"]
