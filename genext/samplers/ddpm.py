"""DDPM (Ho et al., arXiv 2006.11239) with diffusers' `DDPMScheduler` API, config and numbers.

The ancestral step is one `genext::sampler_step` call (mode DDPM): x0 from the model output,
clipped or thresholded, then prev = c3 * x0 + c4 * x + c5 * noise with c3, c4, c5 derived on the
host in diffusers' 0-dim float32 arithmetic from a CPU copy of `alphas_cumprod`. Training uses
`add_noise` (and `get_velocity` for v-prediction targets).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..ops._sampler_step import NUM_COEF, StepKind

# diffusers' pipeline loader looks a component's base class up by name in the module that
# model_index.json records (this one): SchedulerMixin must be an attribute here
from ._base import SchedulerMixin  # noqa: F401
from ._discrete import DiscreteScheduler, Generator
from ._schedule import check_choice, spaced_timesteps

VARIANCE_TYPES = (
    "fixed_small",
    "fixed_small_log",
    "fixed_large",
    "fixed_large_log",
    "learned",
    "learned_range",
)


class DDPMScheduler(DiscreteScheduler):
    """diffusers' `DDPMScheduler` (same constructor fields and defaults), one fused kernel per step.

    Variance types: fixed_small (posterior variance), fixed_small_log, fixed_large (beta_t),
    fixed_large_log, and the learned ones, where the model output carries 2C channels (the second
    half is the predicted variance, as in diffusers). Two deliberate differences from diffusers:
    fixed_large_log uses the noise scale exp(0.5 * log(beta_t)) (diffusers takes the square root of
    the negative log and produces NaN); the learned types scale the noise by the per-element
    standard deviation with one or two elementwise ops before the fused call (diffusers' values)."""

    _name = "DDPMScheduler"
    _beta_schedules = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
    order = 1

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        self._register_config(locals())
        check_choice("variance_type", variance_type, VARIANCE_TYPES, self._name)
        self._build_schedule()
        self.one = torch.tensor(1.0)
        self.custom_timesteps = False
        self.variance_type = variance_type

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        """The inference timesteps: num_inference_steps spaced by `timestep_spacing`, or a custom
        strictly descending list `timesteps` (below num_train_timesteps), on `device`."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(
                "DDPMScheduler.set_timesteps: pass exactly one of num_inference_steps and timesteps"
            )
        cfg = self.config
        if timesteps is not None:
            ts = np.asarray(list(timesteps), dtype=np.int64)
            if len(ts) == 0 or np.any(ts[1:] >= ts[:-1]):
                raise ValueError(
                    "DDPMScheduler.set_timesteps: custom timesteps must be a "
                    "non-empty strictly descending sequence"
                )
            if ts[0] >= cfg.num_train_timesteps:
                raise ValueError(
                    f"DDPMScheduler.set_timesteps: custom timesteps must start below "
                    f"num_train_timesteps ({cfg.num_train_timesteps}), got {ts[0]}"
                )
            self.custom_timesteps = True
        else:
            ts = spaced_timesteps(
                cfg.num_train_timesteps,
                num_inference_steps,
                cfg.timestep_spacing,
                cfg.steps_offset,
                owner=self._name,
            )
            self.num_inference_steps = num_inference_steps
            self.custom_timesteps = False
        self._set_schedule(ts, device)

    def _prev_at(self, t: int, index: int | None) -> int:
        if not (self.custom_timesteps or self.num_inference_steps):
            return t - 1  # no schedule set: the full training chain
        if index is None:
            raise ValueError(
                f"DDPMScheduler: timestep {t} is not in the schedule set by set_timesteps"
            )
        return self._timestep_list[index + 1] if index + 1 < len(self._timestep_list) else -1

    def previous_timestep(self, timestep: Any) -> int:
        """The timestep after `timestep` in the schedule (-1 after the last; t - 1 when no
        schedule was set)."""
        t = int(timestep)
        return self._prev_at(t, self._position.get(t))

    def _coefficients(self, t: int, prev_t: int) -> tuple[list, Tensor, Tensor]:
        """Memoised per (t, prev_t): see _compute_coefficients (same values, no per-step tensor
        ops on the host)."""
        cache = self.__dict__.setdefault("_coef_cache", {})
        if (t, prev_t) not in cache:
            coef, posterior, cur_beta = self._compute_coefficients(t, prev_t)
            cache[(t, prev_t)] = (coef + [0.0] * (NUM_COEF - len(coef)), posterior, cur_beta)
        return cache[(t, prev_t)]

    def _compute_coefficients(self, t: int, prev_t: int) -> tuple[list, Tensor, Tensor]:
        """[c0 .. c5] of the DDPM mode (c5 = the fixed noise scale, 0 when learned or t == 0),
        plus the clamped posterior variance and beta_t for the learned types; diffusers' 0-dim
        float32 arithmetic."""
        acp = self.alphas_cumprod
        a_t = acp[t]
        a_prev = acp[prev_t] if prev_t >= 0 else self.one
        b_t = 1 - a_t
        b_prev = 1 - a_prev
        cur_alpha = a_t / a_prev
        cur_beta = 1 - cur_alpha
        posterior = torch.clamp((1 - a_prev) / (1 - a_t) * cur_beta, min=1e-20)
        vt = self.variance_type
        if vt == "fixed_small":
            scale = posterior**0.5
        elif vt == "fixed_small_log":
            scale = torch.exp(0.5 * torch.log(posterior))
        elif vt == "fixed_large":
            scale = cur_beta**0.5
        elif vt == "fixed_large_log":
            scale = torch.exp(0.5 * torch.log(cur_beta))  # diffusers: log(beta) ** 0.5 = NaN
        else:
            scale = None
        coef = [
            (a_t**0.5).item(),  # c0: x0 from x
            (b_t**0.5).item(),  # c1
            float(self.config.clip_sample_range),  # c2: clip bound
            ((a_prev**0.5 * cur_beta) / b_t).item(),  # c3: x0 weight
            (cur_alpha**0.5 * b_prev / b_t).item(),  # c4: sample weight
            scale.item() if (scale is not None and t > 0) else 1.0,  # c5: noise weight
        ]
        return coef, posterior, cur_beta

    def step(
        self,
        model_output: Tensor,
        timestep: Any,
        sample: Tensor,
        generator: Generator = None,
        return_dict: bool = True,
        guidance_scale: float | None = None,
        out: Tensor | None = None,
    ):
        """x_t -> x_{t-1} (diffusers' DDPM step; `out`: write prev_sample there, may be `sample`); noise drawn from `generator` exactly as diffusers
        draws it when t > 0. model_output: like sample (B, C, ...), (B, 2C, ...) with a learned
        variance, or the two stacked as [uncond, cond] along dim 0 with guidance_scale (the
        guidance combines the C prediction channels; a learned variance is the cond half's).
        Returns SchedulerOutput(prev_sample, pred_original_sample) or that tuple."""
        self._check_step_inputs(model_output, sample, guidance_scale)
        t = self._host_timestep(timestep)
        prev_t = self._prev_at(t, self._step_index)
        predicted_variance = None
        learned = self.variance_type in ("learned", "learned_range")
        if learned:
            C = sample.shape[1]
            if model_output.shape[1] != 2 * C:
                raise ValueError(
                    f"DDPMScheduler.step: variance_type {self.variance_type!r} needs "
                    f"a model output of {2 * C} channels (prediction, variance), got "
                    f"{model_output.shape[1]}"
                )
            predicted_variance = model_output[-sample.shape[0] :, C:]
            model_output = model_output[:, :C]
        coef, posterior, cur_beta = self._coefficients(t, prev_t)
        noise = None
        if t > 0:
            noise = self._draw_noise(sample, model_output, generator)
            if self.variance_type == "learned":
                noise = predicted_variance**0.5 * noise
            elif self.variance_type == "learned_range":
                frac = (predicted_variance + 1) / 2
                log_var = frac * torch.log(cur_beta) + (1 - frac) * torch.log(posterior)
                noise = torch.exp(0.5 * log_var) * noise
        return self._fused_step(
            StepKind.DDPM, sample, model_output, coef, noise, guidance_scale, out, return_dict
        )
