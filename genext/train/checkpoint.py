"""Training checkpoints as one safetensors file.

Tensors are stored under prefixes: ``model.<key>`` (the model's state_dict),
``optim.<optimizer>.<id>.<key>`` (each named optimizer's per-parameter state, flattened),
``rng.<name>`` (random generator states as uint8
tensors), and any extra tensors the caller passes (e.g. the loss history). Everything that is not a
tensor (the step, the optimizer's param_groups and non-tensor state, data-stream positions, the run
configuration) is JSON in the file's metadata under the key ``"genext"``.

The file is written to a temporary name and renamed, so a run killed mid-save leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._deps import require

__all__ = [
    "Checkpoint",
    "capture_rng",
    "flatten_optimizer",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
    "unflatten_optimizer",
]

_META_KEY = "genext"


@dataclass
class Checkpoint:
    """What a checkpoint file holds, split back into its parts."""

    model: dict[str, Tensor]
    optimizers: dict[str, dict[str, Any]]  # name -> the optimizer's state_dict()
    rng: dict[str, Tensor]
    extra: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimizer ``state_dict()`` as flat tensors ``{"<param id>.<key>": t}`` plus the JSON-able
    rest (``param_groups`` and any non-tensor per-parameter values)."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, Tensor):
                tensors[f"{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten_optimizer`: a state_dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, values in rest["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    # JSON turned tuples (Adam's betas) into lists; give them back as the optimizer made them
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
        for g in rest["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict[str, Tensor]:
    """Every random state a training step can draw from, as tensors: torch's CPU generator, each
    CUDA device's, numpy's and Python's global generators, and the named ``generators``."""
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    out["numpy.keys"] = torch.from_numpy(keys.astype(np.int64))
    out["numpy.rest"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
    out["numpy.gauss"] = torch.tensor([gauss], dtype=torch.float64)
    version, internal, gauss_next = random.getstate()
    out["python"] = torch.tensor(internal, dtype=torch.int64)
    out["python.gauss"] = torch.tensor(
        [float("nan") if gauss_next is None else gauss_next], dtype=torch.float64
    )
    for name, g in (generators or {}).items():
        out[f"gen.{name}"] = g.get_state()
    return out


def restore_rng(states: dict[str, Tensor], generators: dict[str, torch.Generator] | None = None):
    """Put back what :func:`capture_rng` took (CUDA states only where this process has them)."""
    torch.set_rng_state(states["torch"])
    cuda = sorted(k for k in states if k.startswith("cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([states[k] for k in cuda][: torch.cuda.device_count()])
    pos, has_gauss = (int(v) for v in states["numpy.rest"])
    keys = states["numpy.keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, pos, has_gauss, float(states["numpy.gauss"][0])))
    gauss = float(states["python.gauss"][0])
    internal = tuple(int(v) for v in states["python"])
    random.setstate((3, internal, None if gauss != gauss else gauss))
    for name, g in (generators or {}).items():
        g.set_state(states[f"gen.{name}"])


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` to ``path`` (atomically: a temporary file, then a rename)."""
    st = require("safetensors.torch")
    opt_tensors: dict[str, Tensor] = {}
    opt_rest: dict[str, Any] = {}
    for name, state in ckpt.optimizers.items():
        if "." in name:
            raise ValueError(f"optimizer names may not contain '.', got {name!r}")
        flat, opt_rest[name] = flatten_optimizer(state)
        opt_tensors.update({f"{name}.{k}": v for k, v in flat.items()})
    tensors: dict[str, Tensor] = {}
    for prefix, part in (
        ("model.", ckpt.model),
        ("optim.", opt_tensors),
        ("rng.", ckpt.rng),
        ("extra.", ckpt.extra),
    ):
        # safetensors wants contiguous CPU tensors that share no memory
        tensors.update({prefix + k: v.detach().cpu().contiguous().clone() for k, v in part.items()})
    meta = {"meta": ckpt.meta, "optimizer": opt_rest}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    st.save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta)})
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a file written by :func:`save_checkpoint` (tensors on the CPU)."""
    safetensors = require("safetensors")
    parts: dict[str, dict[str, Tensor]] = {"model": {}, "optim": {}, "rng": {}, "extra": {}}
    with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
        meta = json.loads(f.metadata()[_META_KEY])
        for name in f.keys():
            prefix, key = name.split(".", 1)
            parts[prefix][key] = f.get_tensor(name)
    optimizers = {}
    for name, rest in meta["optimizer"].items():
        own = {k[len(name) + 1 :]: v for k, v in parts["optim"].items() if k.startswith(name + ".")}
        optimizers[name] = unflatten_optimizer(own, rest)
    return Checkpoint(
        model=parts["model"],
        optimizers=optimizers,
        rng=parts["rng"],
        extra=parts["extra"],
        meta=meta["meta"],
    )
