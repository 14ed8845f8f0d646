"""What the whole-model benches share: a genext model against its peer (diffusers' model with the
same weights, or the peer with genext's layers patched in), each eager and under torch.compile,
forward and forward + backward, and one check of genext's output against the peer's.

A model bench supplies ``call(model, inputs) -> Tensor`` (one forward of the model on the case's
inputs) and the inputs dict: one entry per implementation holding its model (None when that
implementation is unavailable, e.g. diffusers is not installed) plus the tensors ``call`` reads.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .registry import Timing

Call = Callable[[Any, dict], Tensor]

# Timed calls per whole-model row on the CPU. The shared 2-core machine's per-call times swing by
# 10-30% over seconds, and with 2-3 interleaved calls a row's ratio moved between 0.79x and 1.07x
# from run to run for models whose operator profiles matched within a few percent. More calls cost
# some 30 s per bench run.
CPU_MODEL_REPS = 7


def quiet_cast(model, **to):
    """``model.to(**to)`` with diffusers' warning about casting a model by ``.to(dtype)``
    silenced: a bench casts every model the same way."""
    try:
        from diffusers.utils import logging as diffusers_logging
    except ImportError:
        return model.to(**to)
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return model.to(**to)
    finally:
        diffusers_logging.set_verbosity(level)


def perturbed_(model: torch.nn.Module, scale: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """Adds seeded noise to every parameter in place, so no norm weight is a trivial 1 and no bias
    a trivial 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) * scale)
    return model


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_against_peer(
    dtype: torch.dtype, ours, peer, call: Call, inputs: dict, peer_name: str = "diffusers"
) -> tuple[bool | None, str]:
    """genext's output against the peer's on ``inputs``: float32 within 1e-5 relative of the
    peer's; 16-bit no worse than twice the peer's own error against the peer run in float64 with
    the same weights (so a genext model that computes something else fails, instead of being the
    yardstick)."""
    if peer is None:
        return None, f"{peer_name} not available"
    with torch.no_grad():
        mine, theirs = call(ours, inputs).double(), call(peer, inputs).double()
    if not torch.isfinite(mine).all():
        return False, "non-finite output"
    if dtype == torch.float32:
        err = rel_err(mine, theirs)
        return err < 1e-5, f"rel {err:.1e} vs {peer_name}"
    ref_model = quiet_cast(copy.deepcopy(peer), dtype=torch.float64)
    r64 = {
        k: (v.double() if isinstance(v, Tensor) and v.is_floating_point() else v)
        for k, v in inputs.items()
    }
    with torch.no_grad():
        ref = call(ref_model, r64)
    ours_err, peer_err = rel_err(mine, ref), rel_err(theirs, ref)
    return ours_err <= 2 * peer_err + 1e-6, f"rel {ours_err:.1e} ({peer_name} {peer_err:.1e})"


def model_setup(key: str, direction: str, compiled: bool, call: Call):
    """The harness's setup for one row: ``inputs[key]``'s model called by ``call``, without
    gradients (``direction`` "fwd", "decode", "step") or as a training step (``"f+b"``: forward,
    then the gradients of the weights against a fixed random output gradient)."""

    def setup(inputs: dict):
        model = inputs[key]
        if model is None:
            return None

        def run():
            return call(model, inputs)

        if compiled:
            # static shapes: a bench's cases share this code, and dynamic-shape recompiles failed in
            # inductor on torch 2.14 (CPU) for some model cases
            run = torch.compile(run, dynamic=False)
        if direction != "f+b":

            def infer(i):
                with torch.no_grad():
                    return run()

            return infer
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            gy = torch.randn_like(call(model, inputs))

        def step(i):  # as a training step runs them: forward, then gradients of the weights
            return torch.autograd.grad(run(), params, gy)

        return step

    return setup


def model_timings(
    impls: list[tuple[str, str]],
    directions: tuple[str, ...],
    call: Call,
    warmup: int,
    reps: int,
    cuda: bool,
    compile_too: bool,
    compile_keys: tuple[str, ...] = ("genext", "diffusers"),
) -> tuple[Timing, ...]:
    """One timing per (direction, implementation): ``impls`` are (row label, inputs key) pairs
    run eagerly; with ``compile_too`` the ``compile_keys`` also run under torch.compile (a
    compiler failure becomes a row, not the end of the bench). The first implementation's row of
    the first direction carries the case's check note."""
    rows = [(label, key, False) for label, key in impls]
    if compile_too:
        rows += [(f"{key}+compile", key, True) for key in compile_keys]
    return tuple(
        Timing(
            label,
            direction,
            model_setup(key, direction, compiled, call),
            warmup,
            reps,
            peak_memory=cuda,
            shows_check=label == impls[0][0] and direction == directions[0],
            on_error="failed" if compiled else None,
        )
        for direction in directions
        for label, key, compiled in rows
    )
