"""Contrastive losses: genext.ops.clip_loss (and, on the CPU, siglip_loss) forward + backward
against the eager loss that builds the N x N logits (genext.reference.clip_loss / siglip_loss,
open_clip's formulas in the features' dtype), with the losses checked against float64 and, on
CUDA, each one's peak memory beyond its inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import reference
from ..ops import clip_loss, siglip_loss
from .registry import DTYPE, IMPL, PEAK_MIB, Bench, Case, Column, Config, Timing, device_cases


@dataclass(frozen=True)
class ClipCase:
    N: int
    D: int
    eager: bool = True  # False: too large for the N x N logits, genext alone
    loss: str = "clip"  # or "siglip" (logit bias -10, positives on the diagonal)
    dtype: torch.dtype | None = None  # None: the run's dtype, else bf16 on CUDA and fp32 on the CPU

    @property
    def name(self) -> str:
        shape = f"N{self.N}D{self.D}"
        return shape if self.loss == "clip" else f"{self.loss} {shape}"


CUDA_CASES = [ClipCase(32768, 768), ClipCase(8192, 512), ClipCase(1048576, 512, eager=False)]
# the CPU's: CLIP and SigLIP at training batch shapes, and a small bf16 one (the eager loss in
# bf16 runs its N x N elementwise ops in bf16, slow on CPUs without bf16 arithmetic)
CPU_CASES = [
    ClipCase(4096, 512),
    ClipCase(2048, 512, loss="siglip"),
    ClipCase(1024, 128, dtype=torch.bfloat16),
    ClipCase(1024, 128, loss="siglip", dtype=torch.bfloat16),
]
CPU_QUICK_CASE = ClipCase(1024, 128)
LOSSES = {
    "clip": {"genext": clip_loss, "eager": reference.clip_loss},
    "siglip": {"genext": siglip_loss, "eager": reference.siglip_loss},
}


class ClipInputs(NamedTuple):
    image: torch.Tensor  # (N, D), unit rows, requires grad
    text: torch.Tensor
    scale: torch.Tensor  # the logit scale, a 0-dim fp32 tensor that requires grad
    bias: torch.Tensor | None = None  # SigLIP's logit bias, 0-dim fp32, requires grad


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
    scale = torch.tensor(14.3, device=device, requires_grad=True)
    if case.loss == "siglip":
        return ClipInputs(i, t, scale, torch.tensor(-10.0, device=device, requires_grad=True))
    return ClipInputs(i, t, scale)


def clip_check(case: ClipCase, inputs: ClipInputs) -> tuple[bool | None, str]:
    """genext's loss against the float64 loss on the same features: within 1e-5 relative in
    float32; in 16 bits no worse than twice the eager loss's error (its logits and cross-entropy
    in the features' dtype) plus one rounding of the loss in that dtype."""
    if not case.eager:
        return None, ""  # the float64 logits would not fit either
    i, t, s, b = inputs
    losses = LOSSES[case.loss]
    extra = () if b is None else (b,)
    with torch.no_grad():
        ref = losses["eager"](i.double(), t.double(), s.double(), *extra).item()
        ours = losses["genext"](i, t, s, *extra).item()
        eager = losses["eager"](i, t, s, *extra).item()
    e_ours, e_eager = abs(ours - ref), abs(eager - ref)
    if i.dtype == torch.float32:
        ok = e_ours <= 1e-5 * max(1.0, abs(ref))
    else:
        ok = e_ours <= 2 * e_eager + torch.finfo(i.dtype).eps * max(1.0, abs(ref))
    return ok, f"loss {ours:.5f} err {e_ours:.1e} (eager {e_eager:.1e})"


def _setup(loss):
    def setup(inputs: ClipInputs):
        args = tuple(x for x in inputs if x is not None)

        def step(_i):
            loss(*args).backward()

        return step

    return setup


def make_case(case: ClipCase, config: Config) -> Case:
    default = torch.bfloat16 if config.device == "cuda" else torch.float32
    dtype = case.dtype or config.dtype_or(default)
    warmup, reps = (2, 5) if config.device == "cuda" else (1, 3)
    impls = ["genext"] + (["eager"] if case.eager else [])
    timings = tuple(
        Timing(
            impl,
            "f+b",
            _setup(LOSSES[case.loss][impl]),
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
    "CLIP / SigLIP loss forward + backward: genext vs the eager N x N loss (ms, peak extra MiB on "
    "CUDA)",
    cases,
    (Column("clip loss case", "case"), DTYPE, IMPL, Column("f+b ms", "ms", ".3f"), PEAK_MIB),
)
