"""Diffusion schedulers with diffusers' API and config whose `step` is one fused genext kernel
(the kernel contract in genext/ops/_sampler_step.py), matching diffusers' trajectories in fp32; `step(...,
guidance_scale=w)` also fuses classifier-free guidance on a [uncond; cond] model output."""

from ._base import SchedulerConfig, SchedulerOutput
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .flow_match import FlowMatchEulerDiscreteScheduler

__all__ = [
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "SchedulerConfig",
    "SchedulerOutput",
]
