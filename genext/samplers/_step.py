"""The fused sampler step: one `genext::sampler_step` call per scheduler step.

The kernel evaluates, elementwise and in fp32, the same expression as the diffusers scheduler, in
the same operation order, with scalar coefficients the scheduler computes on the host (as fp32
values, the way diffusers computes them from its fp32 schedule tensors), so that trajectories
match diffusers to rounding. `eager_step` below is that expression in plain PyTorch: the
specification of the kernels, the baseline of the benchmarks and a reference for the tests.

Per mode, with x = sample, m = model output (after guidance: u + w * (c - u)), and coef = c[..]:

  x0 (modes 0-2): prediction_type 0 (epsilon): x0 = (x - c1 * m) / c0
                  prediction_type 1 (sample):  x0 = m
                  prediction_type 2 (v):       x0 = c0 * x - c1 * m
     then x0 = clamp(x0, -s, s) / s with s = threshold_scale[n] when given, else when clip
     x0 = clamp(x0, -c2, c2).
  mode 0, DDIM:  c0 = alpha_prod_t ** 0.5, c1 = beta_prod_t ** 0.5, c3 = alpha_prod_t_prev ** 0.5,
                 c4 = (1 - alpha_prod_t_prev - std_dev_t ** 2) ** 0.5, c5 = std_dev_t,
                 c6 = 1 to re-derive eps from the clipped x0 (use_clipped_model_output).
                 eps = m (epsilon) | (x - c0 * m) / c1 (sample: from the unclipped x0 = m,
                 as diffusers computes it) | c0 * m + c1 * x (v);
                 if c6: eps = (x - c0 * x0) / c1
                 prev = c3 * x0 + c4 * eps;  with noise: prev = prev + c5 * noise
  mode 1, DDPM:  c0, c1 as DDIM; c3 = pred_original_sample_coeff, c4 = current_sample_coeff,
                 c5 = the noise scale. prev = c3 * x0 + c4 * x;  with noise: prev + c5 * noise
  mode 2, DPM-Solver++ (data prediction; order = 1 + len(history), history newest first):
                 c0 = alpha_t, c1 = sigma_t of the current sigma (for x0); c3 = the sample
                 coefficient, c4, c5, c6 = the D0, D1, D2 coefficients (signs included), c7 = the
                 noise coefficient (SDE), c8 = 1 / r0, c9 = 1 / r1, c10 = r0 / (r0 + r1),
                 c11 = 1 / (r0 + r1).
                 D0 = x0; order 2: D1 = c8 * (x0 - h1); order 3: D1_0 = c8 * (x0 - h1),
                 D1_1 = c9 * (h1 - h2), D1 = D1_0 + c10 * (D1_0 - D1_1), D2 = c11 * (D1_0 - D1_1).
                 prev = c3 * x + c4 * D0 [+ c5 * D1] [+ c6 * D2] [+ c7 * noise]
  mode 3, flow-matching Euler: x0 = m; prev = x + c3 * m (c3 = sigma_next - sigma); with noise
                 (stochastic sampling): x0 = x - c4 * m, prev = c5 * x0 + c6 * noise
                 (c4 = sigma, c5 = 1 - sigma_next, c6 = sigma_next).

Returns (prev_sample, x0) in the sample's dtype.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..ops.sampler_step import NUM_COEF, sampler_step

MODE_DDIM, MODE_DDPM, MODE_DPM, MODE_FLOW = 0, 1, 2, 3
PREDICTION_TYPES = {"epsilon": 0, "sample": 1, "v_prediction": 2}

__all__ = ["MODE_DDIM", "MODE_DDPM", "MODE_DPM", "MODE_FLOW", "NUM_COEF", "PREDICTION_TYPES",
           "eager_step", "sampler_step"]


def eager_step(mode: int, sample: Tensor, model_output: Tensor, coef: Sequence[float], *,
               prediction_type: int = 0, history: Sequence[Tensor] = (),
               noise: Optional[Tensor] = None, threshold_scale: Optional[Tensor] = None,
               clip: bool = False, guidance_scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """The kernel's expression in plain PyTorch, fp32 arithmetic (the specification)."""
    c = [float(v) for v in coef] + [0.0] * (NUM_COEF - len(coef))
    f32 = torch.float32

    def div(a: Tensor, b: float) -> Tensor:
        # a divisor on a's device: PyTorch's CUDA division by a host scalar multiplies by its
        # reciprocal (a different rounding); the kernels divide exactly
        return a / torch.tensor(b, dtype=f32, device=a.device)

    x = sample.to(f32)
    m = model_output.to(f32)
    if guidance_scale is not None:
        u, cond = m.chunk(2)
        m = u + guidance_scale * (cond - u)
    if mode == MODE_FLOW:
        if noise is None:
            x0 = m
            prev = x + c[3] * m
        else:
            x0 = x - c[4] * m
            prev = c[5] * x0 + c[6] * noise.to(f32)
        return prev.to(sample.dtype), x0.to(sample.dtype)
    if prediction_type == 0:
        x0 = div(x - c[1] * m, c[0])
    elif prediction_type == 1:
        x0 = m
    else:
        x0 = c[0] * x - c[1] * m
    if threshold_scale is not None:
        s = threshold_scale.to(f32).view(-1, *([1] * (x.dim() - 1)))
        x0 = torch.clamp(x0, -s, s) / s
    elif clip:
        x0 = x0.clamp(-c[2], c[2])
    if mode == MODE_DDIM:
        if prediction_type == 0:
            eps = m
        elif prediction_type == 1:
            eps = div(x - c[0] * m, c[1])  # from the raw prediction, before clipping (diffusers)
        else:
            eps = c[0] * m + c[1] * x
        if c[6] != 0.0:
            eps = div(x - c[0] * x0, c[1])
        prev = c[3] * x0 + c[4] * eps
        if noise is not None:
            prev = prev + c[5] * noise.to(f32)
    elif mode == MODE_DDPM:
        prev = c[3] * x0 + c[4] * x
        if noise is not None:
            prev = prev + c[5] * noise.to(f32)
    elif mode == MODE_DPM:
        prev = c[3] * x + c[4] * x0
        if len(history) == 1:
            d1 = c[8] * (x0 - history[0].to(f32))
            prev = prev + c[5] * d1
        elif len(history) == 2:
            h1, h2 = history[0].to(f32), history[1].to(f32)
            d1_0 = c[8] * (x0 - h1)
            d1_1 = c[9] * (h1 - h2)
            d1 = d1_0 + c[10] * (d1_0 - d1_1)
            d2 = c[11] * (d1_0 - d1_1)
            prev = prev + c[5] * d1
            prev = prev + c[6] * d2
        if noise is not None:
            prev = prev + c[7] * noise.to(f32)
    else:
        raise ValueError(f"sampler_step: unknown mode {mode}")
    return prev.to(sample.dtype), x0.to(sample.dtype)
