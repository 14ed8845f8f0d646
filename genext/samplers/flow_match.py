"""Flow-matching Euler sampler (rectified flow, SD3-class models) with diffusers' API and numbers.

`FlowMatchEulerDiscreteScheduler` mirrors diffusers' class of the same name: the same config
fields and defaults, the same `set_timesteps` (shift, dynamic shift with `mu`, `shift_terminal`,
Karras/exponential sigmas, inverted sigmas, custom `sigmas`/`timesteps`) and the same `step`,
whose update runs as one `genext::sampler_step` call (mode 3):

    deterministic:  prev = x + (sigma_next - sigma) * v
    stochastic:     x0 = x - sigma * v;  prev = (1 - sigma_next) * x0 + sigma_next * noise

The scalar coefficients are the float32 values diffusers computes from its float32 sigma tensor;
they are read from host copies of the schedule, so no step after the first touches the device
from the host (the first one looks the timestep up, as diffusers does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..ops._sampler_step import StepKind, sampler_step

# diffusers' pipeline loader looks a component's base class up by name in the module that
# model_index.json records (this one): SchedulerMixin must be an attribute here
from ._base import (
    SchedulerBase,
    SchedulerMixin,  # noqa: F401
    SchedulerOutput,
    check_tensor,
)
from ._schedule import randn_like_diffusers

_OWNER = "FlowMatchEulerDiscreteScheduler"


class FlowMatchEulerDiscreteScheduler(SchedulerBase):
    """Euler steps along the flow-matching ODE x_sigma = (1 - sigma) * x0 + sigma * noise, with the
    model predicting the velocity v = noise - x0. A drop-in for diffusers'
    `FlowMatchEulerDiscreteScheduler` (constructor arguments, `from_config`, `set_timesteps`,
    `step`, `scale_noise`), plus `guidance_scale=` on `step` for fused classifier-free guidance.

    Not supported: `use_beta_sigmas` (needs scipy's beta quantiles; raises NotImplementedError).
    """

    order = 1
    init_noise_sigma = 1.0

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
    ):
        self._register_config(locals())
        if int(use_karras_sigmas) + int(use_exponential_sigmas) + int(use_beta_sigmas) > 1:
            raise ValueError(
                f"{_OWNER}: use at most one of use_karras_sigmas, "
                "use_exponential_sigmas and use_beta_sigmas"
            )
        if use_beta_sigmas:
            raise NotImplementedError(
                f"{_OWNER}: use_beta_sigmas is not supported (it needs "
                "scipy's beta quantiles); use karras or exponential sigmas"
            )
        if time_shift_type not in ("exponential", "linear"):
            raise ValueError(
                f"{_OWNER}: time_shift_type must be 'exponential' or 'linear', "
                f"got {time_shift_type!r}"
            )

        # The training schedule: timesteps N, N-1, ..., 1 (float32, built by numpy as diffusers
        # does), sigmas t / N, shifted unless the shift is applied per resolution later.
        train_t = torch.from_numpy(
            np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()
        )
        sigmas = train_t / num_train_timesteps
        if not use_dynamic_shifting:
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        self.timesteps = sigmas * num_train_timesteps
        self.sigmas = sigmas
        self.sigma_min = sigmas[-1].item()
        self.sigma_max = sigmas[0].item()
        self._shift = shift
        self.num_inference_steps: int | None = None
        self._step_index = None
        self._begin_index = None
        self._set_host_schedule(self.timesteps, self.sigmas)

    # ---- schedule --------------------------------------------------------------------------------

    @property
    def shift(self) -> float:
        """The static shift in use (`set_shift` changes it; the config keeps the original)."""
        return self._shift

    def set_shift(self, shift: float) -> None:
        self._shift = shift

    def _sigma_to_t(self, sigma: Any) -> Any:
        return sigma * self.config.num_train_timesteps

    def time_shift(self, mu: float, sigma: float, t: Any) -> Any:
        """Resolution-dependent shift of the sigmas `t` (used with use_dynamic_shifting)."""
        if self.config.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
        return mu / (mu + (1 / t - 1) ** sigma)

    def stretch_shift_to_terminal(self, t: Any) -> Any:
        """Rescale 1 - t so that the last sigma becomes config.shift_terminal."""
        complement = 1 - t
        scale = complement[-1] / (1 - self.config.shift_terminal)
        return 1 - (complement / scale)

    @staticmethod
    def _karras(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
        # Karras et al. (2022) spacing, rho = 7, in float64 numpy as diffusers computes it
        rho = 7.0
        ramp = np.linspace(0, 1, n)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        return (hi + ramp * (lo - hi)) ** rho

    @staticmethod
    def _exponential(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
        return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
        timesteps: Sequence[float] | None = None,
    ) -> None:
        """The inference schedule: `num_inference_steps` evenly spaced training sigmas (or the given
        `sigmas`/`timesteps`), shifted (statically, or with `mu` under use_dynamic_shifting),
        stretched to `shift_terminal`, optionally respaced (Karras / exponential), with a final
        sigma 0 appended (1 with invert_sigmas). `timesteps` goes to `device`, `sigmas` too (as
        in diffusers); a CPU copy of both stays for the step coefficients."""
        cfg = self.config
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError(f"{_OWNER}: mu must be passed when use_dynamic_shifting is True")
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError(f"{_OWNER}: sigmas and timesteps must have the same length")
        if num_inference_steps is not None:
            if (sigmas is not None and len(sigmas) != num_inference_steps) or (
                timesteps is not None and len(timesteps) != num_inference_steps
            ):
                raise ValueError(
                    f"{_OWNER}: sigmas and timesteps must have num_inference_steps "
                    "entries when num_inference_steps is given"
                )
        elif sigmas is None and timesteps is None:
            raise ValueError(f"{_OWNER}: pass num_inference_steps, sigmas or timesteps")
        else:
            num_inference_steps = len(sigmas) if sigmas is not None else len(timesteps)
        if num_inference_steps < 1:
            raise ValueError(
                f"{_OWNER}.set_timesteps: num_inference_steps must be at least 1, got "
                f"{num_inference_steps}"
            )
        self.num_inference_steps = num_inference_steps

        given_timesteps = timesteps is not None
        if given_timesteps:
            timesteps = np.array(timesteps).astype(np.float32)
        # Without custom sigmas the work is in float64 numpy (linspace of the training range);
        # custom sigmas are cast to float32 first, so their shifting runs in float32 (diffusers).
        if sigmas is None:
            if timesteps is None:
                timesteps = np.linspace(
                    self._sigma_to_t(self.sigma_max),
                    self._sigma_to_t(self.sigma_min),
                    num_inference_steps,
                )
            sigma_arr = timesteps / cfg.num_train_timesteps
        else:
            sigma_arr = np.array(sigmas).astype(np.float32)
            num_inference_steps = len(sigma_arr)

        if cfg.use_dynamic_shifting:
            sigma_arr = self.time_shift(mu, 1.0, sigma_arr)
        else:
            sigma_arr = self.shift * sigma_arr / (1 + (self.shift - 1) * sigma_arr)
        if cfg.shift_terminal:
            sigma_arr = self.stretch_shift_to_terminal(sigma_arr)
        if cfg.use_karras_sigmas:
            sigma_arr = self._karras(sigma_arr[-1].item(), sigma_arr[0].item(), num_inference_steps)
        elif cfg.use_exponential_sigmas:
            sigma_arr = self._exponential(
                sigma_arr[-1].item(), sigma_arr[0].item(), num_inference_steps
            )

        sig = torch.from_numpy(np.asarray(sigma_arr)).to(dtype=torch.float32, device=device)
        if given_timesteps:
            ts = torch.from_numpy(timesteps).to(dtype=torch.float32, device=device)
        else:
            ts = sig * cfg.num_train_timesteps
        if cfg.invert_sigmas:
            # diffusers' Mochi option: the timesteps follow the inverted sigmas (even custom ones)
            sig = 1.0 - sig
            ts = sig * cfg.num_train_timesteps
            sig = torch.cat([sig, torch.ones(1, device=sig.device)])
        else:
            sig = torch.cat([sig, torch.zeros(1, device=sig.device)])

        self.timesteps = ts
        self.sigmas = sig
        self._step_index = None
        self._begin_index = None
        self._set_host_schedule(ts, sig)

    def _set_host_schedule(self, timesteps: Tensor, sigmas: Tensor) -> None:
        """CPU copies of the schedule and the per-step coefficients as Python floats. The
        coefficients are float32 differences computed elementwise over the whole vector, which is
        bit-identical to diffusers' 0-dim float32 ops (IEEE subtraction is correctly rounded)."""
        self._timesteps_host = timesteps.detach().to("cpu")
        sig = sigmas.detach().to("cpu", torch.float32)
        self._sigmas_host = sig
        self._sigma_list: list[float] = sig.tolist()
        self._dt_list: list[float] = (sig[1:] - sig[:-1]).tolist()
        self._one_minus_list: list[float] = (1.0 - sig).tolist()

    # ---- step ------------------------------------------------------------------------------------

    def index_for_timestep(self, timestep: Any, schedule_timesteps: Tensor | None = None) -> int:
        if schedule_timesteps is None:
            schedule_timesteps = self._timesteps_host
        return super().index_for_timestep(timestep, schedule_timesteps)

    def _init_step_index(self, timestep: Any) -> None:
        if self._begin_index is None:
            if isinstance(timestep, Tensor):
                timestep = timestep.to("cpu")
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def scale_model_input(self, sample: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Identity (flow-matching models take the sample unscaled)."""
        return sample

    def step(
        self,
        model_output: Tensor,
        timestep: float | Tensor,
        sample: Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        per_token_timesteps: Tensor | None = None,
        return_dict: bool = True,
        *,
        variance_noise: Tensor | None = None,
        guidance_scale: float | None = None,
        out: Tensor | None = None,
    ) -> SchedulerOutput | tuple:
        """One Euler step from `timestep` (a value of `timesteps`) to the next sigma (`out`: write
        the new sample there; it may be `sample`).

        model_output: the predicted velocity, shaped like `sample`; with `guidance_scale=w`, the
        unconditional and conditional predictions stacked along dim 0 (twice the batch), combined
        as u + w * (c - u) inside the fused step. s_churn, s_tmin, s_tmax and s_noise are accepted
        for diffusers' signature and, as there, unused. With config.stochastic_sampling, the noise
        is `variance_noise` if given, else drawn like diffusers (sample's shape, float32, from
        `generator`). Returns `SchedulerOutput(prev_sample)` (diffusers' flow output has no
        pred_original_sample), or `(prev_sample,)` with return_dict=False."""
        if isinstance(timestep, int) or (
            isinstance(timestep, Tensor) and not timestep.is_floating_point()
        ):
            raise ValueError(
                f"{_OWNER}.step: pass a value of scheduler.timesteps as timestep, "
                "not an integer index (e.g. from enumerate(timesteps))"
            )
        where = f"{_OWNER}.step"
        # the per-token fallback computes in float32 from any floating dtype; the fused step
        # serves float32, float16 and bfloat16
        check_tensor(where, "model_output", model_output, step=per_token_timesteps is None)
        check_tensor(where, "sample", sample, step=per_token_timesteps is None)
        if variance_noise is not None:
            check_tensor(where, "variance_noise", variance_noise, step=False)
        if self._step_index is None:
            self._init_step_index(timestep)
        if per_token_timesteps is not None:
            return self._step_per_token(
                model_output,
                sample,
                per_token_timesteps,
                generator,
                variance_noise,
                guidance_scale,
                return_dict,
            )

        i = self._step_index
        noise = None
        if self.config.stochastic_sampling:
            if variance_noise is not None:
                noise = variance_noise.to(device=sample.device, dtype=torch.float32)
            else:
                noise = randn_like_diffusers(sample.shape, generator, sample.device, torch.float32)
            sigma, sigma_next = self._sigma_list[i], self._sigma_list[i + 1]
            coef = [
                0.0,
                0.0,
                0.0,
                0.0,
                sigma,
                self._one_minus_list[i + 1],
                sigma_next,
                0.0,
                0.0,
                0.0,
                0.0,
                0.0,
            ]
        else:
            coef = [0.0, 0.0, 0.0, self._dt_list[i], 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        prev, _ = sampler_step(
            StepKind.FLOW,
            sample,
            model_output,
            coef,
            noise=noise,
            guidance_scale=guidance_scale,
            out=out,
        )
        self._step_index += 1
        # diffusers computes in float32 and returns the model output's dtype
        prev = prev.to(model_output.dtype)
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def _step_per_token(
        self,
        model_output: Tensor,
        sample: Tensor,
        per_token_timesteps: Tensor,
        generator: Any,
        variance_noise: Tensor | None,
        guidance_scale: float | None,
        return_dict: bool,
    ):
        """FALLBACK (plain PyTorch, not the fused op): per-token timesteps make sigma a tensor,
        which the op's scalar coefficients cannot carry. Each token steps from its own sigma to the
        largest schedule sigma below it (1e-6 margin), as diffusers does."""
        x = sample.to(torch.float32)
        v = model_output
        if guidance_scale is not None:
            u, c = v.to(torch.float32).chunk(2)
            v = u + guidance_scale * (c - u)
        tok_sigma = per_token_timesteps / self.config.num_train_timesteps
        sched = self.sigmas[:, None, None]
        below = sched < tok_sigma[None] - 1e-6
        next_sigma = (below * sched).max(dim=0).values[..., None]
        cur_sigma = tok_sigma[..., None]
        if self.config.stochastic_sampling:
            x0 = x - cur_sigma * v
            noise = (
                variance_noise.to(device=x.device, dtype=x.dtype)
                if variance_noise is not None
                else randn_like_diffusers(x.shape, generator, x.device, x.dtype)
            )
            prev = (1.0 - next_sigma) * x0 + next_sigma * noise
        else:
            # diffusers quirk: here the step is current - next (the opposite sign of the
            # scalar-sigma path's next - current), kept as is
            prev = x + (cur_sigma - next_sigma) * v
        self._step_index += 1
        # and, unlike the scalar path, diffusers leaves this result in float32
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    # ---- forward process -------------------------------------------------------------------------

    def scale_noise(
        self, sample: Tensor, timestep: float | Tensor, noise: Tensor | None = None
    ) -> Tensor:
        """The forward process at `timestep` (one per batch row): sigma * noise + (1 - sigma) *
        sample, with sigma looked up like diffusers (by timestep value, or the begin/step index
        once a pipeline set one)."""
        check_tensor(f"{_OWNER}.scale_noise", "sample", sample, step=False)
        check_tensor(f"{_OWNER}.scale_noise", "noise", noise, step=False)
        sigma = self._row_sigmas(timestep, sample)
        return sigma * noise + (1.0 - sigma) * sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps
