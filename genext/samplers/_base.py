"""What genext's schedulers share: diffusers-style config handling, the step output, and the
step-index bookkeeping (`set_begin_index`, `index_for_timestep`).

When diffusers is installed the schedulers derive from its `SchedulerMixin` and `ConfigMixin`,
as diffusers' own schedulers do: its pipelines then save them (model_index.json names genext's
class, the config goes to ``scheduler/scheduler_config.json``), load them back, and accept them
where they check a component's type. Without diffusers, small stand-ins give the same config
access and the same file layout."""

from __future__ import annotations

import inspect
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

CONFIG_NAME = "scheduler_config.json"

# the schedulers diffusers lists as compatible with its DDIM, DDPM and DPM-Solver schedulers (they
# share the alphas_cumprod config); `scheduler.compatibles` resolves the names in diffusers
KARRAS_COMPATIBLES = [
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler",
    "UniPCMultistepScheduler",
    "DPMSolverSDEScheduler",
    "EDMEulerScheduler",
]


class SchedulerConfig(dict):
    """The scheduler's configuration without diffusers: a dict whose keys also read as attributes,
    like diffusers' FrozenDict (so `scheduler.config.num_train_timesteps` and
    `dict(scheduler.config)` both work). With diffusers installed the config is its FrozenDict.
    Not meant to be changed after construction: build a new scheduler with `from_config`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"scheduler config has no field {name!r}") from None


def _json_value(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def _config_dir(path: str | os.PathLike, subfolder: str | None) -> str:
    return os.path.join(os.fspath(path), subfolder) if subfolder else os.fspath(path)


class ConfigStandIn:
    """The part of diffusers' `ConfigMixin` genext's schedulers use, for when diffusers is not
    installed: the config as a read-only mapping (`register_to_config`, `config`) and
    `save_config`, which writes `scheduler_config.json` with `_class_name` as diffusers does."""

    config_name: str | None = None

    def register_to_config(self, **fields: Any) -> None:
        self._internal_dict = SchedulerConfig({**getattr(self, "_internal_dict", {}), **fields})

    @property
    def config(self) -> SchedulerConfig:
        return self._internal_dict

    def save_config(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write the config to `save_directory`/scheduler_config.json (the directory is created)."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory must be a directory, got the file {save_directory}")
        os.makedirs(save_directory, exist_ok=True)
        fields = {k: _json_value(v) for k, v in self.config.items()}
        fields["_class_name"] = type(self).__name__
        with open(os.path.join(save_directory, self.config_name), "w", encoding="utf-8") as f:
            f.write(json.dumps(fields, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load_config(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None
    ) -> dict:
        """The config dict saved in a local directory (or its `subfolder`)."""
        path = os.path.join(_config_dir(pretrained_model_name_or_path, subfolder), cls.config_name)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{cls.__name__}.from_pretrained: no {cls.config_name} in "
                f"{_config_dir(pretrained_model_name_or_path, subfolder)} (without diffusers only "
                "local directories can be read)"
            )
        with open(path, encoding="utf-8") as f:
            return json.load(f)


class SchedulerStandIn:
    """The part of diffusers' `SchedulerMixin` genext's schedulers use, for when diffusers is not
    installed: `save_pretrained` / `from_pretrained` of a local directory, diffusers' layout."""

    config_name = CONFIG_NAME
    _compatibles: list[str] = []
    has_compatibles = True

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        return_unused_kwargs: bool = False,
        **kwargs: Any,
    ):
        """The scheduler saved in a local directory (or its `subfolder`, e.g. "scheduler" of a
        saved pipeline); keyword arguments override config fields."""
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder)
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write `save_directory`/scheduler_config.json, which `from_pretrained` reads."""
        self.save_config(save_directory)


try:
    from diffusers import ConfigMixin, SchedulerMixin
except ImportError:  # genext's schedulers work alone; the stand-ins keep the file layout
    ConfigMixin, SchedulerMixin = ConfigStandIn, SchedulerStandIn
except Exception as e:  # an installed diffusers that fails to import (e.g. a torch it predates)
    warnings.warn(
        f"genext.samplers: diffusers is installed but failed to import ({type(e).__name__}: {e}); "
        "genext's schedulers work without it, but are not diffusers schedulers in this process",
        RuntimeWarning,
        stacklevel=2,
    )
    ConfigMixin, SchedulerMixin = ConfigStandIn, SchedulerStandIn


def _init_defaults(class_name: Any) -> dict[str, Any]:
    """The keyword defaults of diffusers' scheduler class `class_name` ({} when diffusers or the
    class is not there)."""
    if not isinstance(class_name, str) or SchedulerMixin is SchedulerStandIn:
        return {}
    import diffusers

    source = getattr(diffusers, class_name, None)
    if source is None:
        return {}
    return {
        k: p.default
        for k, p in inspect.signature(source.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


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


class SchedulerBase(SchedulerMixin, ConfigMixin):
    """Config plumbing for subclasses whose __init__ takes the config fields as keyword
    arguments (with diffusers' names and defaults) and calls `self._register_config(locals())`.

    With diffusers installed this is a diffusers scheduler (`SchedulerMixin`, `ConfigMixin`):
    `save_pretrained` / `from_pretrained` (with `subfolder`), `save_config`, `compatibles`, and
    the config a diffusers pipeline may rewrite (`register_to_config`) are diffusers' own."""

    config_name = CONFIG_NAME
    _compatibles: list[str] = []
    order = 1

    def _register_config(self, values: dict) -> None:
        params = inspect.signature(type(self).__init__).parameters
        self.register_to_config(**{k: values[k] for k in params if k != "self"})

    @classmethod
    def from_config(
        cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any
    ) -> Any:
        """A scheduler from a config: a dict, a genext or diffusers config, or a scheduler of either
        library (its `.config`); keyword arguments override fields. Fields this class does not know
        (diffusers' `_class_name`, other schedulers' options) are ignored, as diffusers does.
        Fields a diffusers config lists in `_use_default_values` (never set, so holding the
        source class's defaults) are dropped when the config is of another class, as diffusers
        does, so that this class's own defaults apply; they are kept when the config is of this
        class, and when their value is not the source class's default (a pipeline rewrote it
        after construction: StableDiffusionPipeline sets steps_offset to 1 and leaves it listed).
        With `return_unused_kwargs`, returns (scheduler, the keyword arguments that are not
        fields)."""
        if isinstance(config, (str, os.PathLike)):
            raise TypeError(
                f"{cls.__name__}.from_config: config must be a config dict or a scheduler, got the "
                f"path {config!r}; use {cls.__name__}.from_pretrained(path) to read a saved one"
            )
        if config is not None and not isinstance(config, dict) and hasattr(config, "config"):
            config = config.config
        config = dict(config or {})
        listed = set(config.pop("_use_default_values", None) or ())
        source = config.get("_class_name")
        if listed and source != cls.__name__:
            defaults = _init_defaults(source)
            for key in listed:
                if key not in defaults or config.get(key) == defaults[key]:
                    config.pop(key, None)
        params = inspect.signature(cls.__init__).parameters
        fields = {k: v for k, v in config.items() if k in params and k != "self"}
        unused = {k: v for k, v in kwargs.items() if k not in params or k == "self"}
        fields.update({k: v for k, v in kwargs.items() if k not in unused})
        scheduler = cls(**fields)
        return (scheduler, unused) if return_unused_kwargs else scheduler

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
