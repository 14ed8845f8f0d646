"""What a task is, and the registry that maps names to tasks."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data import Split

__all__ = ["Task", "TaskDefaults", "get_task", "register", "task_names"]

_REGISTRY: dict[str, type[Task]] = {}
WARMUP_STEPS = 50


@dataclass(frozen=True)
class TaskDefaults:
    """A task's default run for one dataset: what ``genext train <task>`` does without options."""

    steps: int
    batch_size: int
    lr: float
    size: int | None = None  # image side (digits) or patch side (photos); None: the data's own


class Task(ABC):
    """A trainable model on a dataset.

    Subclasses set ``name``, ``datasets`` (the names :func:`genext.train.data.load_data` knows
    that the task supports, the first being the default) and ``defaults`` (one
    :class:`TaskDefaults` per dataset), and implement the methods below.
    """

    name: str = ""
    datasets: tuple[str, ...] = ()
    defaults: dict[str, TaskDefaults] = {}

    @abstractmethod
    def model_config(self, data: Split) -> dict[str, Any]:
        """The model's constructor arguments for ``data`` (saved in the checkpoint)."""

    def configure(self, data: Split, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """:meth:`model_config` with ``overrides`` (the command line's ``--model-config``)
        applied on top."""
        return self.model_config(data) | (overrides or {})

    @abstractmethod
    def build(self, config: dict[str, Any]) -> nn.Module:
        """A fresh model from :meth:`model_config`'s arguments."""

    @abstractmethod
    def objective(self, model: nn.Module) -> nn.Module:
        """A module holding ``model`` (as its attribute ``model``) whose ``forward(x, y, generator)`` returns
        ``(loss, logs)`` for images ``x`` and labels ``y``: the scalar to minimise and a dict of
        detached scalar tensors. It may define ``after_step(generator)``, called after every
        optimizer step (e.g. to restart dead codebook entries). Its buffers are saved with the
        checkpoint."""

    def optimizers(self, model: nn.Module, lr: float) -> dict[str, torch.optim.Optimizer]:
        """The optimizers by name (names without dots); one AdamW over the model by default."""
        return {"model": torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)}

    def wrap(self, objective: nn.Module) -> nn.Module:
        """``objective`` for a distributed run: DDP, without DDP's per-forward copy of rank 0's
        buffers over the others' (objectives sync their own buffers, equal at the start)."""
        ddp = nn.parallel.DistributedDataParallel
        if "forward_sync_buffers" in inspect.signature(ddp).parameters:  # newer torch's name
            return ddp(objective, forward_sync_buffers=False)
        return ddp(objective, broadcast_buffers=False)

    def train_step(
        self,
        objective: nn.Module,
        wrapped: nn.Module,
        x: Tensor,
        y: Tensor,
        generator: torch.Generator,
        optimizers: dict[str, torch.optim.Optimizer],
    ) -> dict[str, Tensor]:
        """One optimisation step on batch ``(x, y)``; returns the logged scalars (``"loss"``
        first). ``wrapped`` is ``objective`` or its DDP wrapper: call it, not ``objective``, for
        the forward. The default: one loss, one optimizer, then ``objective.after_step``."""
        loss, logs = wrapped(x, y, generator)
        opt = optimizers["model"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if hasattr(objective, "after_step"):
            objective.after_step(generator)
        return {"loss": loss.detach()} | logs

    @abstractmethod
    def evaluate(self, model: nn.Module, data: Split) -> dict[str, float]:
        """Held-out figures of the trained ``model`` (eval mode, no gradients)."""

    def pictures(self, model: nn.Module, data: Split, generator: torch.Generator) -> list[Tensor]:
        """Rows of images ``(n, C, H, W)`` in [-1, 1] for the picture grid (e.g. held-out
        originals, their reconstructions, samples); none (no ``samples.png``) by default."""
        return []

    def row_titles(self) -> list[str]:
        """Labels for the rows :meth:`pictures` returns."""
        return []

    def text_samples(self, model: nn.Module, data: Split, generator: torch.Generator) -> str | None:
        """Text drawn from the trained ``model`` for ``samples.txt`` (text tasks); None: no file."""
        return None

    def lr_factor(self, step: int, steps: int) -> float:
        """The learning rate's factor at ``step`` of ``steps``; a function of the step only, so
        resumed runs follow the same schedule. Default: linear warm-up over WARMUP_STEPS steps,
        then 1 (independent of ``steps``, so a run can be resumed with more steps)."""
        return min(1.0, (step + 1) / WARMUP_STEPS)

    def figures(self, out: Path, metrics: dict[str, Any]) -> None:
        """Extra PNGs drawn from :meth:`evaluate`'s ``metrics`` into the run folder ``out``
        (e.g. accuracy against guidance scale); none by default."""
        return None


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` available as ``genext train <cls.name>``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"task name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = cls
    return cls


def task_names() -> list[str]:
    """The registered task names, sorted."""
    return sorted(_REGISTRY)


def get_task(name: str) -> Task:
    """A fresh instance of the task registered as ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(task_names())}")
    return _REGISTRY[name]()
