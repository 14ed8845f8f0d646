"""Diffusion schedulers with diffusers' API whose step is one fused genext kernel."""
from ._base import SchedulerConfig, SchedulerOutput
from ._step import eager_step, sampler_step

__all__ = ["SchedulerConfig", "SchedulerOutput", "eager_step", "sampler_step"]
