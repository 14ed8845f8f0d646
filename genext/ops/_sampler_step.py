"""The fused diffusion-sampler step op (``genext::sampler_step``): a kernel contract, not an API.

The public way in is a scheduler of :mod:`genext.samplers`, which computes the coefficients on the
host and calls :func:`sampler_step` once per step. ``genext.reference.sampler_step`` is the same
expression in plain PyTorch (the specification of the kernels, the benchmarks' eager baseline and
the tests' reference).

The kernel evaluates, elementwise and in fp32, the same expression as the diffusers scheduler, in
the same operation order, with scalar coefficients the scheduler computes on the host (as fp32
values, the way diffusers computes them from its fp32 schedule tensors), so that trajectories
match diffusers to rounding.

Per kind, with x = sample, m = model output (after guidance: u + w * (c - u)), and coef = c[..]:

  x0 (DDIM, DDPM, DPM): prediction_type 0 (epsilon): x0 = (x - c1 * m) / c0
                  prediction_type 1 (sample):  x0 = m
                  prediction_type 2 (v):       x0 = c0 * x - c1 * m
     then x0 = clamp(x0, -s, s) / s with s = threshold_scale[n] when given, else when clip
     x0 = clamp(x0, -c2, c2).
  StepKind.DDIM: c0 = alpha_prod_t ** 0.5, c1 = beta_prod_t ** 0.5, c3 = alpha_prod_t_prev ** 0.5,
                 c4 = (1 - alpha_prod_t_prev - std_dev_t ** 2) ** 0.5, c5 = std_dev_t,
                 c6 = 1 to re-derive eps from the clipped x0 (use_clipped_model_output).
                 eps = m (epsilon) | (x - c0 * m) / c1 (sample: from the unclipped x0 = m,
                 as diffusers computes it) | c0 * m + c1 * x (v);
                 if c6: eps = (x - c0 * x0) / c1
                 prev = c3 * x0 + c4 * eps;  with noise: prev = prev + c5 * noise
  StepKind.DDPM: c0, c1 as DDIM; c3 = pred_original_sample_coeff, c4 = current_sample_coeff,
                 c5 = the noise scale. prev = c3 * x0 + c4 * x;  with noise: prev + c5 * noise
  StepKind.DPM, DPM-Solver++ (data prediction; order = 1 + len(history), history newest first):
                 c0 = alpha_t, c1 = sigma_t of the current sigma (for x0); c3 = the sample
                 coefficient, c4, c5, c6 = the D0, D1, D2 coefficients (signs included), c7 = the
                 noise coefficient (SDE), c8 = 1 / r0, c9 = 1 / r1, c10 = r0 / (r0 + r1),
                 c11 = 1 / (r0 + r1).
                 D0 = x0; order 2: D1 = c8 * (x0 - h1); order 3: D1_0 = c8 * (x0 - h1),
                 D1_1 = c9 * (h1 - h2), D1 = D1_0 + c10 * (D1_0 - D1_1), D2 = c11 * (D1_0 - D1_1).
                 prev = c3 * x + c4 * D0 [+ c5 * D1] [+ c6 * D2] [+ c7 * noise]
  StepKind.FLOW, flow-matching Euler: x0 = m; prev = x + c3 * m (c3 = sigma_next - sigma); with noise
                 (stochastic sampling): x0 = x - c4 * m, prev = c5 * x0 + c6 * noise
                 (c4 = sigma, c5 = 1 - sigma_next, c6 = sigma_next).

Returns (prev_sample, x0) in the sample's dtype.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import torch
from torch import Tensor

from ._common import declare_kernels

__all__ = ["NUM_COEF", "PredictionType", "StepKind", "sampler_step"]


# The numbers below are the C++ side's too: enum Mode, enum Pred and kNumCoef in
# csrc/sampler_step/sampler_step_math.h. Change both together.
class StepKind(enum.IntEnum):
    """Which scheduler's update the kernel applies (the op's ``kind`` argument)."""

    DDIM = 0
    DDPM = 1
    DPM = 2  # DPM-Solver++ (orders 1-3, SDE variant)
    FLOW = 3  # flow-matching Euler


class PredictionType(enum.IntEnum):
    """What the model predicts (the op's ``prediction_type`` argument); the member names are
    diffusers' ``prediction_type`` strings in upper case."""

    EPSILON = 0
    SAMPLE = 1
    V_PREDICTION = 2


NUM_COEF = 12  # scalars per step (the op's coef list)

# sample dtypes; the arithmetic is float32 for all of them
declare_kernels(
    ["sampler_step", "sampler_step_out"],
    cpu=(torch.float32, torch.float16, torch.bfloat16),
    cuda=(torch.float32, torch.float16, torch.bfloat16),
)


def sampler_step(
    mode: int,
    sample: Tensor,
    model_output: Tensor,
    coef: Sequence[float],
    *,
    prediction_type: int = PredictionType.EPSILON,
    history: Sequence[Tensor] = (),
    noise: Tensor | None = None,
    threshold_scale: Tensor | None = None,
    clip: bool = False,
    guidance_scale: float | None = None,
    out: Tensor | None = None,
    x0_out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One fused sampler step: returns (prev_sample, x0) like sample. `guidance_scale` given means
    model_output holds [uncond, cond] along dim 0, combined as u + w * (c - u) in the kernel.
    `out` / `x0_out`: contiguous tensors shaped and typed like sample to write into (out may be
    the sample itself: an in-place step; x0_out must not alias an input), for loops that keep
    static buffers, e.g. under CUDA-graph capture. Modes and coefficients: see the
    module docstring. Not differentiable (sampling only)."""
    if type(coef) is list and len(coef) == NUM_COEF:
        c = coef  # schedulers pass full lists of floats: no copy on this per-step path
    else:
        c = [float(v) for v in coef] + [0.0] * (NUM_COEF - len(coef))
        if len(c) != NUM_COEF:
            raise ValueError(f"sampler_step: at most {NUM_COEF} coefficients, got {len(coef)}")
    args = (
        int(mode),
        sample,
        model_output,
        list(history),
        noise,
        threshold_scale,
        c,
        int(prediction_type),
        bool(clip),
        guidance_scale is not None,
        float(guidance_scale) if guidance_scale is not None else 1.0,
    )
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
def _fake(
    kind,
    sample,
    model_output,
    history,
    noise,
    threshold_scale,
    coef,
    prediction_type,
    clip,
    guidance,
    guidance_scale,
):
    torch._check(len(coef) == NUM_COEF, lambda: f"sampler_step: coef must hold {NUM_COEF} values")
    return sample.new_empty(sample.shape), sample.new_empty(sample.shape)


@torch.library.register_fake("genext::sampler_step_out")
def _fake_out(
    kind,
    sample,
    model_output,
    history,
    noise,
    threshold_scale,
    coef,
    prediction_type,
    clip,
    guidance,
    guidance_scale,
    prev,
    x0,
):
    torch._check(len(coef) == NUM_COEF, lambda: f"sampler_step: coef must hold {NUM_COEF} values")
    return None
