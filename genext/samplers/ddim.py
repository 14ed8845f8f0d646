"""DDIM (Song et al., arXiv 2010.02502) with diffusers' `DDIMScheduler` API, config and numbers.

Each step is one `genext::sampler_step` call (mode DDIM): the scalar coefficients are derived on
the host with the same 0-dim float32 torch arithmetic diffusers uses, from a CPU copy of
`alphas_cumprod`, so the trajectory matches diffusers to float32 rounding and nothing is read back
from the device. Dynamic thresholding adds one per-sample quantile before the fused call.

The discrete-time machinery it shares with `DDPMScheduler` is `DiscreteScheduler` (_discrete.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..ops._sampler_step import NUM_COEF, StepKind

# diffusers' pipeline loader looks a component's base class up by name in the module that
# model_index.json records (this one): SchedulerMixin must be an attribute here
from ._base import (
    SchedulerMixin,  # noqa: F401
    check_tensor,
)
from ._discrete import DiscreteScheduler, Generator
from ._schedule import spaced_timesteps


class DDIMScheduler(DiscreteScheduler):
    """diffusers' `DDIMScheduler` (same constructor fields and defaults), one fused kernel per step.

    `step(..., guidance_scale=w)` takes a model output of batch 2B holding [uncond, cond] and
    applies classifier-free guidance u + w * (c - u) inside the same kernel."""

    _name = "DDIMScheduler"
    order = 1

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        self._register_config(locals())
        self._build_schedule()
        # the "previous" alphas_cumprod of the last step: 1, or alphas_cumprod[0]
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(
        self, num_inference_steps: int, device: str | torch.device | None = None
    ) -> None:
        """The inference timesteps (diffusers' leading / trailing / linspace spacing) on `device`;
        a CPU copy is kept for the host-side coefficients."""
        cfg = self.config
        ts = spaced_timesteps(
            cfg.num_train_timesteps,
            num_inference_steps,
            cfg.timestep_spacing,
            cfg.steps_offset,
            owner=self._name,
        )
        self.num_inference_steps = num_inference_steps
        self._set_schedule(ts, device)

    def _coefficients(
        self, t: int, eta: float, use_clipped_model_output: bool
    ) -> tuple[list, Tensor]:
        """[c0 .. c6] of the DDIM mode and std_dev_t, in diffusers' 0-dim float32 arithmetic,
        memoised per (t, steps, eta, flag): a step then costs a dict lookup on the host, not a
        dozen tiny tensor ops (the values are the same either way)."""
        key = (t, self.num_inference_steps, float(eta), bool(use_clipped_model_output))
        cache = self.__dict__.setdefault("_coef_cache", {})
        if key in cache:
            return cache[key]
        coef, std = self._compute_coefficients(t, eta, use_clipped_model_output)
        cache[key] = (coef + [0.0] * (NUM_COEF - len(coef)), std)  # the op's full length
        return cache[key]

    def _compute_coefficients(
        self, t: int, eta: float, use_clipped_model_output: bool
    ) -> tuple[list, Tensor]:
        # diffusers' quirk: the previous timestep is t - T // N, whatever the spacing (with
        # trailing/linspace spacing it need not be the next entry of `timesteps`)
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        acp = self.alphas_cumprod
        a_t = acp[t]
        a_prev = acp[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t = 1 - a_t
        variance = ((1 - a_prev) / b_t) * (1 - a_t / a_prev)
        std_dev_t = eta * variance**0.5
        coef = [
            (a_t**0.5).item(),  # c0: x0 and eps from x
            (b_t**0.5).item(),  # c1
            float(self.config.clip_sample_range),  # c2: clip bound
            (a_prev**0.5).item(),  # c3: x0 weight
            ((1 - a_prev - std_dev_t**2) ** 0.5).item(),  # c4: eps weight
            float(std_dev_t),  # c5: noise weight
            1.0 if use_clipped_model_output else 0.0,  # c6: eps from clipped x0
        ]
        return coef, std_dev_t

    def step(
        self,
        model_output: Tensor,
        timestep: Any,
        sample: Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: Generator = None,
        variance_noise: Tensor | None = None,
        return_dict: bool = True,
        guidance_scale: float | None = None,
        out: Tensor | None = None,
    ):
        """x_t -> x_{t-1} (diffusers' DDIM step); `out`: write prev_sample there (may be `sample`). model_output: like sample (B, ...), or (2B, ...)
        as [uncond, cond] with guidance_scale. eta > 0 adds eta-scaled DDPM noise, drawn from
        `generator` exactly as diffusers draws it, or `variance_noise` when given.
        Returns SchedulerOutput(prev_sample, pred_original_sample) or that tuple."""
        if self.num_inference_steps is None:
            raise ValueError("DDIMScheduler.step: call set_timesteps before step")
        self._check_step_inputs(model_output, sample, guidance_scale)
        t = self._host_timestep(timestep)
        coef, _ = self._coefficients(t, eta, use_clipped_model_output)
        noise = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError(
                    "DDIMScheduler.step: pass either generator or variance_noise, not both"
                )
            if variance_noise is not None:
                check_tensor("DDIMScheduler.step", "variance_noise", variance_noise)
            noise = (
                variance_noise
                if variance_noise is not None
                else self._draw_noise(sample, model_output, generator)
            )
        return self._fused_step(
            StepKind.DDIM, sample, model_output, coef, noise, guidance_scale, out, return_dict
        )
