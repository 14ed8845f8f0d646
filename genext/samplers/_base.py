"""What genext's schedulers share: diffusers-style config handling, the step output, and the
step-index bookkeeping (`set_begin_index`, `index_for_timestep`)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


class SchedulerConfig(dict):
    """The scheduler's configuration: a dict whose keys also read as attributes, like diffusers'
    FrozenDict (so `scheduler.config.num_train_timesteps` and `dict(scheduler.config)` both work).
    Not meant to be changed after construction: build a new scheduler with `from_config`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"scheduler config has no field {name!r}") from None


@dataclass
class SchedulerOutput:
    """What `step` returns with return_dict=True (diffusers' field names)."""

    prev_sample: Tensor
    pred_original_sample: Tensor | None = None

    def __getitem__(self, i: int) -> Any:  # output[0] as in diffusers' BaseOutput
        return self.to_tuple()[i]

    def to_tuple(self) -> tuple:
        return (
            (self.prev_sample,)
            if self.pred_original_sample is None
            else (self.prev_sample, self.pred_original_sample)
        )


class SchedulerBase:
    """Config plumbing for subclasses whose __init__ takes the config fields as keyword
    arguments (with diffusers' names and defaults) and calls `self._register_config(locals())`."""

    order = 1

    def _register_config(self, values: dict) -> None:
        params = inspect.signature(type(self).__init__).parameters
        self.config = SchedulerConfig({k: values[k] for k in params if k != "self"})

    @classmethod
    def from_config(cls, config: Any = None, **kwargs: Any):
        """A scheduler from a config: a dict, a genext or diffusers config, or a scheduler of either
        library (its `.config`); keyword arguments override fields. Fields this class does not know
        (diffusers' `_class_name`, other schedulers' options) are ignored, as diffusers does."""
        if config is not None and not isinstance(config, dict) and hasattr(config, "config"):
            config = config.config
        merged = dict(config or {})
        merged.update(kwargs)
        params = inspect.signature(cls.__init__).parameters
        known = {k: v for k, v in merged.items() if k in params and k != "self"}
        return cls(**known)

    # ---- step index (diffusers' semantics) ------------------------------------------------------

    _step_index: int | None = None
    _begin_index: int | None = None

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Where in `timesteps` the sampling starts (pipelines call this for img2img)."""
        self._begin_index = begin_index

    def index_for_timestep(self, timestep: Any, schedule_timesteps: Tensor | None = None) -> int:
        """Position of `timestep` in the schedule; when it occurs twice, the second (so that a
        step never starts by skipping a sigma in the middle of the schedule), as diffusers does."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        if isinstance(timestep, Tensor):
            timestep = timestep.to(schedule_timesteps.device)
        indices = (schedule_timesteps == timestep).nonzero()
        pos = 1 if len(indices) > 1 else 0
        return int(indices[pos].item())

    def _row_sigmas(self, timesteps: Any, like: Tensor) -> Tensor:
        """The sigma of each batch row's timestep, shaped to broadcast against `like` and in its
        dtype and device, looked up as diffusers does: by timestep value in the host copy of the
        schedule, or at the step/begin index once a pipeline set one. For subclasses with
        `sigmas` and `_timesteps_host` (the sigma-based schedulers)."""
        sigmas = self.sigmas.to(device=like.device, dtype=like.dtype)
        t = torch.as_tensor(timesteps).reshape(-1)
        if self._begin_index is None:
            host = t.to("cpu")
            indices = [self.index_for_timestep(v, self._timesteps_host) for v in host]
        elif self._step_index is not None:
            indices = [self._step_index] * t.shape[0]
        else:
            indices = [self._begin_index] * t.shape[0]
        sigma = sigmas[indices].flatten()
        while sigma.dim() < like.dim():
            sigma = sigma.unsqueeze(-1)
        return sigma

    def _init_step_index(self, timestep: Any) -> None:
        if self._begin_index is None:
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index


# the dtypes the fused step op serves (it computes in float32 for all of them)
STEP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(where: str, name: str, value: Any, step: bool = True) -> None:
    """Raise TypeError naming ``where`` (e.g. "DDIMScheduler.step") and the argument unless
    ``value`` is a tensor of a dtype the fused step serves (``step``) or of any floating dtype.
    Integer tensors would otherwise fail deep inside torch (noise drawing) or, in the
    forward-process helpers, give silently truncated results."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if step and value.dtype not in STEP_DTYPES:
        raise TypeError(
            f"{where}: {name} must be float32, float16 or bfloat16 (the dtypes of the fused step), "
            f"got {value.dtype}"
        )
    if not value.is_floating_point():
        raise TypeError(f"{where}: {name} must be a floating-point tensor, got {value.dtype}")
    if step and value.dim() == 0:
        raise ValueError(f"{where}: {name} must have a batch dim, got a 0-dim tensor")


def as_float_tensor(values: Any) -> Tensor:
    return torch.as_tensor(values, dtype=torch.float32)
