"""GroupNorm + SiLU: genext.ops.group_norm_silu against eager PyTorch (``F.silu(F.group_norm())``)
and torch.compile of it, forward, backward alone (over a retained graph) and forward + backward.

GB/s count the tensor passes at the floor: forward reads x and writes y; backward reads x and
grad_y and writes grad_x; forward + backward is both (5 passes).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import reference
from ..ops import group_norm_silu
from .harness import copies_for_l2
from .registry import (
    DIRECTION,
    DTYPE,
    GBPS,
    IMPL,
    MS,
    PCT_COPY,
    Bench,
    Case,
    Column,
    Config,
    Timing,
    device_cases,
)


@dataclass(frozen=True)
class GNCase:
    shape: tuple[int, ...]
    groups: int = 32
    channels_last: bool = False

    @property
    def name(self) -> str:
        return "x".join(map(str, self.shape)) + ("-cl" if self.channels_last else "")


# The shapes the foundation issue sets targets for (H100/H200 fp16), and the CPU target shape.
CUDA_CASES = [
    GNCase((1, 512, 128, 128)),
    GNCase((1, 256, 256, 256)),
    GNCase((1, 128, 512, 512)),
    GNCase((2, 320, 64, 64)),
    GNCase((2, 1280, 16, 16)),
    GNCase((2, 320, 64, 64), channels_last=True),
]
CPU_CASES = [
    GNCase((1, 128, 256, 256)),
    GNCase((1, 128, 256, 256), channels_last=True),
    GNCase((1, 512, 64, 64)),  # the SD VAE decoder's mid block
    GNCase((2, 320, 64, 64)),  # the SD U-Net's levels at a 64x64 latent, batch 2 (guidance)
    GNCase((2, 640, 32, 32)),
    GNCase((2, 1280, 16, 16)),
    GNCase((2, 1280, 8, 8)),
]
PASSES = {"fwd": 2, "bwd": 3, "f+b": 5}  # tensor passes at the floor, per direction


def gn_inputs(case: GNCase, dtype: torch.dtype, device: str, copies: int = 1, grad: bool = False):
    """`copies` independent (x, weight, bias, grad_y) sets; never zeros."""
    c = case.shape[1]
    sets = []
    for _ in range(copies):
        x = torch.randn(case.shape, device=device, dtype=dtype) * 2 + 1
        if case.channels_last:
            x = x.to(memory_format=torch.channels_last)
        w = (torch.rand(c, device=device) + 0.5).to(dtype)
        b = (torch.rand(c, device=device) - 0.5).to(dtype)
        if grad:
            x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
        gy = torch.randn_like(x) if grad else None
        sets.append((x, w, b, gy))
    return sets


def gn_check(case: GNCase, dtype: torch.dtype, device: str) -> tuple[bool, str]:
    """genext vs the float64 reference: float32 within 1e-5 (relative norm), 16-bit no worse than
    twice eager PyTorch's own error."""
    shape = (min(case.shape[0], 1),) + case.shape[1:]
    x, w, b, _ = gn_inputs(GNCase(shape, case.groups, case.channels_last), dtype, device)[0]
    ref = reference.group_norm_silu(x.double(), case.groups, w.double(), b.double())
    y = group_norm_silu(x, case.groups, w, b).double()
    if not torch.isfinite(y).all():
        return False, "non-finite output"
    if dtype == torch.float32:
        err = ((y - ref).norm() / ref.norm()).item()
        return err < 1e-5, f"rel {err:.1e}"
    ours = (y - ref).abs().max().item()
    pt = (reference.group_norm_silu_eager(x, case.groups, w, b).double() - ref).abs().max().item()
    return ours <= 2 * pt + 1e-6, f"max {ours:.1e} (eager {pt:.1e})"


def retained_graph_compile():
    """torch.compile's backward over a retained graph (the bwd rows) needs donated buffers off;
    AOTAutograd reads the flag both when it compiles and at every such backward, so it is held
    around the whole timing, and only there."""
    import torch._functorch.config as functorch_config

    return functorch_config.patch(donated_buffer=False)


def _setup(case: GNCase, fn: Callable, dtype: torch.dtype, device: str, direction: str):
    """The call to time in one direction, over input copies rotated against L2."""
    size = math.prod(case.shape) * dtype.itemsize
    n = copies_for_l2(size, device)
    sets = gn_inputs(case, dtype, device, copies=n, grad=direction != "fwd")
    if direction == "fwd":

        def call(i):
            x, w, b, _ = sets[i % n]
            fn(x, case.groups, w, b)
    elif direction == "bwd":
        outs = [fn(x, case.groups, w, b) for x, w, b, _ in sets]

        def call(i):
            x, w, b, gy = sets[i % n]
            torch.autograd.grad(outs[i % n], (x, w, b), gy, retain_graph=True)
    else:

        def call(i):  # as a training step runs them
            x, w, b, gy = sets[i % n]
            torch.autograd.grad(fn(x, case.groups, w, b), (x, w, b), gy)

    return call


def make_case(case: GNCase, config: Config) -> Case:
    dtype = config.dtype_or(torch.float16 if config.device == "cuda" else torch.float32)
    impls: dict[str, Callable] = {
        "genext": group_norm_silu,
        "eager": reference.group_norm_silu_eager,
    }
    if config.compile:
        impls["compile"] = torch.compile(reference.group_norm_silu_eager)
    warmup, reps = (5, 20) if config.device == "cuda" else (2, 7)
    if config.quick:
        warmup, reps = 1, 3
    size = math.prod(case.shape) * dtype.itemsize
    timings = tuple(
        Timing(
            impl,
            direction,
            lambda _, fn=fn, d=direction: _setup(case, fn, dtype, config.device, d),
            warmup,
            reps,
            nbytes=PASSES[direction] * size,
            shows_check=direction == "fwd",
            context=retained_graph_compile if impl == "compile" else contextlib.nullcontext,
        )
        for impl, fn in impls.items()
        for direction in PASSES
    )
    return Case(case.name, dtype, timings, lambda _: gn_check(case, dtype, config.device))


def cases(config: Config) -> list[Case]:
    return [make_case(c, config) for c in device_cases(config, CUDA_CASES, CPU_CASES)]


BENCH = Bench(
    "group_norm_silu",
    "GroupNorm + SiLU: genext vs eager vs torch.compile, fwd / bwd / f+b (GB/s, % of copy)",
    cases,
    (Column("group_norm_silu case", "case"), DTYPE, DIRECTION, IMPL, MS, GBPS, PCT_COPY),
)
