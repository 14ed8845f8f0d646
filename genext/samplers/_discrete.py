"""The discrete-time (alphas_cumprod) machinery shared by `DDIMScheduler` and `DDPMScheduler`:
the schedule, host-side timestep resolution, noise drawing, thresholding scale, `add_noise`,
`get_velocity`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..ops._sampler_step import PredictionType, StepKind, sampler_step
from ._base import KARRAS_COMPATIBLES, SchedulerBase, SchedulerOutput, check_tensor
from ._schedule import (
    PREDICTION_TYPES,
    TIMESTEP_SPACINGS,
    check_choice,
    make_alphas_cumprod,
    make_betas,
    randn_like_diffusers,
    rescale_zero_terminal_snr,
    threshold_scale,
)

__all__ = ["DiscreteScheduler", "Generator"]

Generator = None | torch.Generator | Sequence[torch.Generator]


class DiscreteScheduler(SchedulerBase):
    """Shared machinery of the discrete-time (alphas_cumprod) schedulers. Subclasses call
    `_build_schedule()` after `_register_config`."""

    _name = "scheduler"
    _compatibles = KARRAS_COMPATIBLES
    _beta_schedules: Sequence[str] = ("linear", "scaled_linear", "squaredcos_cap_v2")

    def _build_schedule(self) -> None:
        cfg = self.config
        check_choice("prediction_type", cfg.prediction_type, PREDICTION_TYPES, self._name)
        check_choice("timestep_spacing", cfg.timestep_spacing, TIMESTEP_SPACINGS, self._name)
        betas = make_betas(
            cfg.num_train_timesteps,
            cfg.beta_start,
            cfg.beta_end,
            cfg.beta_schedule,
            cfg.trained_betas,
            owner=self._name,
            allowed=self._beta_schedules,
        )
        if cfg.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas = 1.0 - betas
        # float32 on the CPU, never moved: the host derives every step coefficient from it
        self.alphas_cumprod = make_alphas_cumprod(betas)
        self._acp_on: dict = {}  # (device, dtype) -> alphas_cumprod there, for add_noise
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self._set_schedule(np.arange(cfg.num_train_timesteps)[::-1].astype(np.int64), None)

    def _set_schedule(self, timesteps: np.ndarray, device: Any) -> None:
        cpu = torch.from_numpy(np.ascontiguousarray(timesteps, dtype=np.int64))
        self._timesteps_cpu = cpu
        self._timestep_list = [int(t) for t in timesteps]
        # position of each timestep value (DDIM/DDPM schedules never repeat a value)
        self._position = {}
        for i, t in enumerate(self._timestep_list):
            self._position.setdefault(t, i)
        self.timesteps = cpu.to(device) if device is not None else cpu
        self._step_index = None
        self._begin_index = None

    # ---- timesteps on the host -------------------------------------------------------------------

    def _host_timestep(self, timestep: Any) -> int:
        """The step's timestep as a Python int, without a device sync after the first step.

        A Python number or CPU tensor is read directly (diffusers' semantics: any timestep may be
        passed). A timestep on another device is not read back: it is taken to be the schedule's
        entry at the current step index, which the first such step locates (one sync, or none
        after `set_begin_index`), so later steps can run under CUDA-graph capture."""
        if isinstance(timestep, Tensor) and timestep.device.type != "cpu":
            if self._step_index is None or self._step_index >= len(self._timestep_list):
                self._step_index = None
                if self._begin_index is not None:
                    self._step_index = self._begin_index
                else:
                    found = (self._timesteps_cpu == timestep.to("cpu")).nonzero()
                    if len(found) == 0:
                        raise ValueError(
                            f"{self._name}.step: timestep {int(timestep)} is not in "
                            "the schedule set by set_timesteps"
                        )
                    self._step_index = int(found[0])
            return self._timestep_list[self._step_index]
        t = int(timestep)
        self._step_index = self._position.get(t)
        return t

    def _advance(self) -> None:
        if self._step_index is not None:
            self._step_index += 1

    # ---- pieces of a step ------------------------------------------------------------------------

    def _check_step_inputs(
        self, model_output: Tensor, sample: Tensor, guidance_scale: float | None
    ) -> None:
        """The step's input checks: tensors of the fused step's dtypes, and the [uncond, cond]
        batch with guidance."""
        check_tensor(f"{self._name}.step", "model_output", model_output)
        check_tensor(f"{self._name}.step", "sample", sample)
        if guidance_scale is not None and model_output.shape[0] != 2 * sample.shape[0]:
            raise ValueError(
                f"{self._name}.step: with guidance_scale, model_output must stack "
                f"[uncond, cond] along dim 0 (batch {2 * sample.shape[0]}), got shape "
                f"{tuple(model_output.shape)} for a sample of shape "
                f"{tuple(sample.shape)}"
            )

    def _threshold_scale(
        self,
        sample: Tensor,
        model_output: Tensor,
        c0: float,
        c1: float,
        guidance_scale: float | None,
    ) -> Tensor | None:
        """Dynamic thresholding's per-sample scale, from x0 computed with the fused op's own
        expression (guidance included); None when thresholding is off."""
        if not self.config.thresholding:
            return None
        f32 = torch.float32
        x = sample.to(f32)
        m = model_output.to(f32)
        if guidance_scale is not None:
            u, cond = m.chunk(2)
            m = u + guidance_scale * (cond - u)
        ptype = self.config.prediction_type
        if ptype == "epsilon":
            # divide by a tensor on x's device, as the kernel divides (a host scalar divisor
            # becomes a reciprocal multiply on CUDA); torch.full is a fill, so no sync
            x0 = (x - c1 * m) / torch.full((), c0, dtype=f32, device=x.device)
        elif ptype == "sample":
            x0 = m
        else:
            x0 = c0 * x - c1 * m
        return threshold_scale(
            x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value
        )

    def _clip(self) -> bool:
        return bool(self.config.clip_sample) and not self.config.thresholding

    @staticmethod
    def _draw_noise(sample: Tensor, model_output: Tensor, generator: Generator) -> Tensor:
        # diffusers draws with the (guided) model output's shape, device and dtype
        return randn_like_diffusers(
            sample.shape, generator, model_output.device, model_output.dtype
        )

    def _fused_step(
        self,
        kind: StepKind,
        sample: Tensor,
        model_output: Tensor,
        coef: list[float],
        noise: Tensor | None,
        guidance_scale: float | None,
        out: Tensor | None,
        return_dict: bool,
    ):
        """The step's one kernel call (thresholding scale, clipping and guidance included), then
        the step index advanced and the output in diffusers' form."""
        scale = self._threshold_scale(sample, model_output, coef[0], coef[1], guidance_scale)
        prev, x0 = sampler_step(
            kind,
            sample,
            model_output,
            coef,
            prediction_type=PredictionType[self.config.prediction_type.upper()],
            noise=noise,
            threshold_scale=scale,
            clip=self._clip(),
            guidance_scale=guidance_scale,
            out=out,
        )
        self._advance()
        if not return_dict:
            return prev, x0
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    # ---- training-side helpers -------------------------------------------------------------------

    def _acp(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (device, dtype)
        if key not in self._acp_on:
            self._acp_on[key] = self.alphas_cumprod.to(device=device).to(dtype=dtype)
        return self._acp_on[key]

    def _sqrt_alphas(self, like: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        acp = self._acp(like.device, like.dtype)
        a = acp[torch.as_tensor(timesteps).to(like.device)]
        shape = (-1,) + (1,) * max(like.dim() - 1, 0)
        return (a**0.5).flatten().view(shape), ((1 - a) ** 0.5).flatten().view(shape)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """Forward diffusion q(x_t | x_0): sqrt(acp[t]) * x0 + sqrt(1 - acp[t]) * noise, with acp in
        the samples' dtype and one timestep per batch row (or one for all), as diffusers."""
        check_tensor(f"{self._name}.add_noise", "original_samples", original_samples, step=False)
        check_tensor(f"{self._name}.add_noise", "noise", noise, step=False)
        sa, sb = self._sqrt_alphas(original_samples, timesteps)
        return sa * original_samples + sb * noise

    def get_velocity(self, sample: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The v-prediction target sqrt(acp[t]) * noise - sqrt(1 - acp[t]) * sample."""
        check_tensor(f"{self._name}.get_velocity", "sample", sample, step=False)
        check_tensor(f"{self._name}.get_velocity", "noise", noise, step=False)
        sa, sb = self._sqrt_alphas(sample, timesteps)
        return sa * noise - sb * sample

    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        """Identity (these schedulers need no input scaling)."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps
