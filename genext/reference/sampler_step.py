"""The sampler step in plain PyTorch: the specification of ``genext::sampler_step`` (modes and
coefficients: genext/ops/_sampler_step.py), bit-identical to the kernels in fp32."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..ops._sampler_step import NUM_COEF, StepKind

__all__ = ["sampler_step"]


def sampler_step(
    mode: int,
    sample: Tensor,
    model_output: Tensor,
    coef: Sequence[float],
    *,
    prediction_type: int = 0,
    history: Sequence[Tensor] = (),
    noise: Tensor | None = None,
    threshold_scale: Tensor | None = None,
    clip: bool = False,
    guidance_scale: float | None = None,
) -> tuple[Tensor, Tensor]:
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
    if mode == StepKind.FLOW:
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
    if mode == StepKind.DDIM:
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
    elif mode == StepKind.DDPM:
        prev = c[3] * x0 + c[4] * x
        if noise is not None:
            prev = prev + c[5] * noise.to(f32)
    elif mode == StepKind.DPM:
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
