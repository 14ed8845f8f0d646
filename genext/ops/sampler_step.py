"""The fused diffusion-sampler step op (`genext::sampler_step`): its fake kernel and a typed
wrapper. The schedulers in genext.samplers compute the coefficients; genext/samplers/_step.py
documents the modes and holds `eager_step`, the same expression in plain PyTorch."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

NUM_COEF = 12

__all__ = ["sampler_step"]


def sampler_step(mode: int, sample: Tensor, model_output: Tensor, coef: Sequence[float], *,
                 prediction_type: int = 0, history: Sequence[Tensor] = (),
                 noise: Optional[Tensor] = None, threshold_scale: Optional[Tensor] = None,
                 clip: bool = False, guidance_scale: Optional[float] = None,
                 out: Optional[Tensor] = None, x0_out: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """One fused sampler step: returns (prev_sample, x0) like sample. `guidance_scale` given means
    model_output holds [uncond, cond] along dim 0, combined as u + w * (c - u) in the kernel.
    `out` / `x0_out`: contiguous tensors shaped and typed like sample to write into (out may be
    the sample itself: an in-place step; x0_out must not alias an input), for loops that keep
    static buffers, e.g. under CUDA-graph capture. Modes and coefficients: see
    genext/samplers/_step.py. Not differentiable (sampling only)."""
    if type(coef) is list and len(coef) == NUM_COEF:
        c = coef  # schedulers pass full lists of floats: no copy on this per-step path
    else:
        c = [float(v) for v in coef] + [0.0] * (NUM_COEF - len(coef))
        if len(c) != NUM_COEF:
            raise ValueError(f"sampler_step: at most {NUM_COEF} coefficients, got {len(coef)}")
    args = (int(mode), sample, model_output, list(history), noise, threshold_scale, c,
            int(prediction_type), bool(clip), guidance_scale is not None,
            float(guidance_scale) if guidance_scale is not None else 1.0)
    if out is None and x0_out is None:
        return _OP(*args)
    if out is None:
        out = torch.empty_like(sample, memory_format=torch.contiguous_format)
    if x0_out is None:
        x0_out = torch.empty_like(sample, memory_format=torch.contiguous_format)
    _OP_OUT(*args, out, x0_out)
    return out, x0_out


_OP = torch.ops.genext.sampler_step.default
_OP_OUT = torch.ops.genext.sampler_step_out.default


@torch.library.register_fake("genext::sampler_step")
def _fake(kind, sample, model_output, history, noise, threshold_scale, coef, prediction_type, clip,
          guidance, guidance_scale):
    torch._check(len(coef) == NUM_COEF, lambda: f"sampler_step: coef must hold {NUM_COEF} values")
    return sample.new_empty(sample.shape), sample.new_empty(sample.shape)


@torch.library.register_fake("genext::sampler_step_out")
def _fake_out(kind, sample, model_output, history, noise, threshold_scale, coef, prediction_type,
              clip, guidance, guidance_scale, prev, x0):
    torch._check(len(coef) == NUM_COEF, lambda: f"sampler_step: coef must hold {NUM_COEF} values")
    return None
