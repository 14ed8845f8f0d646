"""The training loop behind ``genext train``: one process, or one per rank under ``torchrun``.

- Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process group is
  initialised (gloo on the CPU, NCCL on CUDA), each rank draws its own shard of every epoch
  (:class:`~genext.train.data.BatchStream`) and the objective is wrapped in
  ``DistributedDataParallel``; only rank 0 writes files and evaluates.
- Exact resume: the checkpoint (``<out>/checkpoint.safetensors``) holds the model, the optimizer
  state, the step, every random state of every rank and each rank's data-stream position, so a run
  stopped at step k and resumed gives bit-identical parameters to an uninterrupted run. The
  learning rate depends on the step only (the task's schedule; by default a linear warm-up, then
  constant, so ``--steps`` can be raised on resume to train longer).
- Outputs in ``<out>``: the checkpoint (every ``ckpt_every`` steps and at the end),
  ``loss.png``, ``samples.png`` (the task's picture rows, for image tasks), ``samples.txt`` (for
  text tasks) and ``metrics.json``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ._deps import require
from .checkpoint import Checkpoint, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from .data import BatchStream, Split, load_data
from .plots import save_image_grid, save_loss_curve
from .tasks import Task, get_task

__all__ = ["TrainConfig", "train"]

CHECKPOINT = "checkpoint.safetensors"


@dataclass
class TrainConfig:
    """One run of ``genext train``; ``None`` fields take the task's defaults for the data."""

    task: str = "vae"
    data: str | None = None
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    size: int | None = None
    out: str = "runs/{task}-{data}"
    resume: bool = False
    device: str = "cpu"
    seed: int = 0
    ckpt_every: int = 200
    threads: int | None = None
    progress: bool = True
    evaluate: bool = True
    model_config: dict[str, Any] | None = None  # overrides of the task's model arguments
    stop_after: int | None = None  # end this invocation after this step (tests: interrupt a run)

    def resolved(self) -> TrainConfig:
        """A copy with the task's defaults filled in and ``out`` formatted."""
        task = get_task(self.task)
        data = self.data or task.datasets[0]
        if data not in task.datasets:
            raise ValueError(f"task {task.name} trains on {task.datasets}, not {data!r}")
        d = task.defaults[data]
        cfg = TrainConfig(**asdict(self))
        cfg.data = data
        cfg.steps = d.steps if self.steps is None else self.steps
        cfg.batch_size = d.batch_size if self.batch_size is None else self.batch_size
        cfg.lr = d.lr if self.lr is None else self.lr
        cfg.size = d.size if self.size is None else self.size
        cfg.out = self.out.format(task=task.name, data=data)
        # as JSON has it (lists, not tuples), so it compares equal to a checkpoint's copy
        cfg.model_config = json.loads(json.dumps(self.model_config))
        return cfg


# the config fields a resumed run must share with the checkpoint for the run to be the same run
_MUST_MATCH = ("task", "data", "batch_size", "lr", "size", "seed", "model_config")


class _Dist:
    """This process's place in the run: rank, world size, device."""

    def __init__(self, device: str) -> None:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("--device cuda: no CUDA device is available")
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        elif device == "cpu":
            self.device = torch.device("cpu")
        else:
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        self.owned = False
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device == "cuda" else "gloo")
            self.owned = True
        # a process group made by the caller (even of one rank) is used as it is
        self.distributed = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size() if self.distributed else 1
        self.rank = dist.get_rank() if self.distributed else 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (just ``[obj]`` in a single process)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owned:
            dist.destroy_process_group()


def _objective_state(objective: nn.Module) -> dict[str, torch.Tensor]:
    """The objective's own tensors (e.g. codebook usage counts), without the model's."""
    return {k: v for k, v in objective.state_dict().items() if not k.startswith("model.")}


def _save(
    path: Path,
    ctx: _Dist,
    cfg: TrainConfig,
    model_config: dict[str, Any],
    model: nn.Module,
    objective: nn.Module,
    opts: dict[str, torch.optim.Optimizer],
    stream: BatchStream,
    noise: torch.Generator,
    step: int,
    history: dict[str, list[float]],
) -> None:
    # every rank's random states and data position; rank 0 writes them all
    per_rank = ctx.gather((capture_rng({"noise": noise}), stream.state_dict()))
    if not ctx.main:
        return
    rng = {f"rank{r}.{k}": v for r, (states, _) in enumerate(per_rank) for k, v in states.items()}
    extra = {f"objective.{k}": v for k, v in _objective_state(objective).items()}
    extra |= {f"history.{k}": torch.tensor(v, dtype=torch.float64) for k, v in history.items()}
    meta = {
        "step": step,
        "config": asdict(cfg),
        "model_config": model_config,
        "world_size": ctx.world,
        "streams": [s for _, s in per_rank],
    }
    optimizers = {name: opt.state_dict() for name, opt in opts.items()}
    state = Checkpoint(model.state_dict(), optimizers, rng, extra, meta)
    save_checkpoint(path, state)


def _resume(
    path: Path,
    ctx: _Dist,
    cfg: TrainConfig,
    model: nn.Module,
    objective: nn.Module,
    opts: dict[str, torch.optim.Optimizer],
    stream: BatchStream,
    noise: torch.Generator,
) -> tuple[int, dict[str, list[float]]]:
    ckpt = load_checkpoint(path)
    saved = ckpt.meta["config"]
    for key in _MUST_MATCH:
        if saved[key] != getattr(cfg, key):
            raise ValueError(
                f"--resume: {key} is {getattr(cfg, key)!r} but the checkpoint was trained with "
                f"{saved[key]!r}; use another --out or the same {key}"
            )
    if ckpt.meta["world_size"] != ctx.world:
        raise ValueError(
            f"--resume: the checkpoint has {ckpt.meta['world_size']} ranks' states, this run has "
            f"{ctx.world} ranks"
        )
    model.load_state_dict(ckpt.model)
    own = {k[len("objective.") :]: v for k, v in ckpt.extra.items() if k.startswith("objective.")}
    objective.load_state_dict({f"model.{k}": v for k, v in ckpt.model.items()} | own)
    for name, opt in opts.items():
        opt.load_state_dict(ckpt.optimizers[name])
    stream.load_state_dict(ckpt.meta["streams"][ctx.rank])
    prefix = f"rank{ctx.rank}."
    restore_rng(
        {k[len(prefix) :]: v for k, v in ckpt.rng.items() if k.startswith(prefix)}, {"noise": noise}
    )
    history = {
        k[len("history.") :]: v.tolist() for k, v in ckpt.extra.items() if k.startswith("history.")
    }
    return int(ckpt.meta["step"]), history


def _write_outputs(
    out: Path,
    task: Task,
    cfg: TrainConfig,
    model: nn.Module,
    data: Split,
    history: dict[str, list[float]],
    steps: int,
    train_seconds: float,
) -> dict[str, Any]:
    save_loss_curve(out / "loss.png", history, f"{cfg.task} on {cfg.data}")
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    rows = task.pictures(model, data, gen)
    if rows:
        save_image_grid(out / "samples.png", rows, task.row_titles())
    text = task.text_samples(model, data, gen)
    if text is not None:
        (out / "samples.txt").write_text(text)
    metrics: dict[str, Any] = {"steps": steps, "train_seconds": train_seconds}
    if cfg.evaluate:
        metrics |= task.evaluate(model, data)
        task.figures(out, metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    model.train()
    return metrics


def train(config: TrainConfig) -> dict[str, Any]:
    """Run one training job (see the module docstring); returns rank 0's metrics (the train time
    and, unless ``config.evaluate`` is False, the task's held-out figures), ``{}`` on other
    ranks."""
    tqdm = require("tqdm").tqdm
    cfg = config.resolved()
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ctx = _Dist(cfg.device)
    try:
        return _train(cfg, ctx, tqdm)
    finally:
        ctx.close()
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _train(cfg: TrainConfig, ctx: _Dist, tqdm: Any) -> dict[str, Any]:
    task = get_task(cfg.task)
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    data = load_data(cfg.data, cfg.size)
    model_config = task.configure(data, cfg.model_config)
    model = task.build(model_config).to(ctx.device)
    objective = task.objective(model).to(ctx.device)
    opts = task.optimizers(model, cfg.lr)
    for opt in opts.values():
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])  # the warm-up scales each group's own
    stream = BatchStream(
        data.x_train, cfg.batch_size, cfg.seed, ctx.rank, ctx.world, labels=data.y_train
    )
    noise = torch.Generator().manual_seed(cfg.seed * 1000 + ctx.rank)  # latents, code restarts

    step, history = 0, {}
    if cfg.resume and ckpt_path.exists():
        step, history = _resume(ckpt_path, ctx, cfg, model, objective, opts, stream, noise)
    elif cfg.resume and ctx.main:
        print(f"--resume: no checkpoint at {ckpt_path}, starting from step 0")

    wrapped = task.wrap(objective) if ctx.distributed else objective  # DDP: gradients averaged
    end = min(cfg.steps, cfg.stop_after) if cfg.stop_after is not None else cfg.steps
    bar = tqdm(
        total=cfg.steps, initial=step, disable=not (cfg.progress and ctx.main), desc=cfg.task
    )
    start = time.perf_counter()
    model.train()
    while step < end:
        for opt in opts.values():
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * task.lr_factor(step, cfg.steps)
        x, y = (t.to(ctx.device, non_blocking=True) for t in stream.next_labelled())
        logs = task.train_step(objective, wrapped, x, y, noise, opts)
        step += 1
        values = {k: float(v) for k, v in logs.items()}
        for k, v in values.items():
            history.setdefault(k, []).append(v)
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)
        if step % cfg.ckpt_every == 0 or step == end:
            _save(
                ckpt_path,
                ctx,
                cfg,
                model_config,
                model,
                objective,
                opts,
                stream,
                noise,
                step,
                history,
            )
    bar.close()
    seconds = time.perf_counter() - start
    if ctx.distributed:
        dist.barrier()
    if not ctx.main or step < cfg.steps:
        return {"steps": step, "train_seconds": seconds} if ctx.main else {}
    metrics = _write_outputs(out, task, cfg, model, data, history, step, seconds)
    return metrics
