"""CLIP contrastive loss: genext.ops.clip_loss forward + backward against the eager loss that builds
the N x N logits (genext.reference.clip_loss, open_clip's formula in the features' dtype), with the
losses checked against float64 and, on CUDA, each one's peak memory beyond its inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import reference
from ..ops import clip_loss
from .registry import DTYPE, IMPL, PEAK_MIB, Bench, Case, Column, Config, Timing, device_cases


@dataclass(frozen=True)
class ClipCase:
    N: int
    D: int
    eager: bool = True  # False: too large for the N x N logits, genext alone

    @property
    def name(self) -> str:
        return f"N{self.N}D{self.D}"


CUDA_CASES = [ClipCase(32768, 768), ClipCase(8192, 512), ClipCase(1048576, 512, eager=False)]
CPU_CASES = [ClipCase(4096, 512)]
CPU_QUICK_CASE = ClipCase(1024, 128)
LOSSES = {"genext": clip_loss, "eager": reference.clip_loss}


class ClipInputs(NamedTuple):
    image: torch.Tensor  # (N, D), unit rows, requires grad
    text: torch.Tensor
    scale: torch.Tensor  # the logit scale, a 0-dim fp32 tensor that requires grad


def clip_inputs(case: ClipCase, dtype, device) -> ClipInputs:
    g = torch.Generator(device="cpu").manual_seed(0)
    i = (
        F.normalize(torch.randn(case.N, case.D, generator=g), dim=-1)
        .to(device, dtype)
        .requires_grad_()
    )
    t = (
        F.normalize(torch.randn(case.N, case.D, generator=g), dim=-1)
        .to(device, dtype)
        .requires_grad_()
    )
    return ClipInputs(i, t, torch.tensor(14.3, device=device, requires_grad=True))


def clip_check(case: ClipCase, inputs: ClipInputs) -> tuple[bool | None, str]:
    """genext's loss against the float64 loss on the same features: within 1e-5 relative in
    float32; in 16 bits no worse than twice the eager loss's error (its logits and cross-entropy
    in the features' dtype) plus one rounding of the loss in that dtype."""
    if not case.eager:
        return None, ""  # the float64 logits would not fit either
    i, t, s = inputs
    with torch.no_grad():
        ref = reference.clip_loss(i.double(), t.double(), s.double()).item()
        ours = clip_loss(i, t, s).item()
        eager = reference.clip_loss(i, t, s).item()
    e_ours, e_eager = abs(ours - ref), abs(eager - ref)
    if i.dtype == torch.float32:
        ok = e_ours <= 1e-5 * max(1.0, abs(ref))
    else:
        ok = e_ours <= 2 * e_eager + torch.finfo(i.dtype).eps * max(1.0, abs(ref))
    return ok, f"loss {ours:.5f} err {e_ours:.1e} (eager {e_eager:.1e})"


def _setup(loss):
    def setup(inputs: ClipInputs):
        def step(_i):
            loss(*inputs).backward()

        return step

    return setup


def make_case(case: ClipCase, config: Config) -> Case:
    dtype = torch.bfloat16 if config.device == "cuda" else torch.float32
    warmup, reps = (2, 5) if config.device == "cuda" else (1, 3)
    impls = ["genext"] + (["eager"] if case.eager else [])
    timings = tuple(
        Timing(
            impl,
            "f+b",
            _setup(LOSSES[impl]),
            warmup,
            reps,
            peak_memory=True,
            shows_check=impl == "genext",
            on_error="failed",
        )  # e.g. out of memory
        for impl in impls
    )
    return Case(
        case.name,
        dtype,
        timings,
        lambda inputs: clip_check(case, inputs),
        inputs=lambda: clip_inputs(case, dtype, config.device),
    )


def cases(config: Config) -> list[Case]:
    shapes = device_cases(
        config,
        CUDA_CASES,
        CPU_CASES,
        quick=lambda s: s[1:2] if config.device == "cuda" else [CPU_QUICK_CASE],
    )
    return [make_case(c, config) for c in shapes]


BENCH = Bench(
    "contrastive",
    "CLIP loss forward + backward: genext vs the eager N x N loss (ms, peak extra MiB on CUDA)",
    cases,
    (Column("clip loss case", "case"), DTYPE, IMPL, Column("f+b ms", "ms", ".3f"), PEAK_MIB),
)
