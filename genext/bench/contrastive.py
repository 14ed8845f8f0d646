"""CLIP contrastive loss: genext.ops.clip_loss forward + backward against the eager loss that builds
the N x N logits (open_clip's formula), with the loss values compared and, on CUDA, each one's peak
memory beyond its inputs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

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


def eager_clip_loss(i, t, s):
    logits = s * i @ t.T
    labels = torch.arange(i.shape[0], device=i.device)
    return 0.5 * (F.cross_entropy(logits.float(), labels) + F.cross_entropy(logits.T.float(), labels))


LOSSES = {"genext": clip_loss, "eager": eager_clip_loss}


class ClipInputs(NamedTuple):
    image: torch.Tensor  # (N, D), unit rows, requires grad
    text: torch.Tensor
    scale: torch.Tensor  # the logit scale, a 0-dim fp32 tensor that requires grad


def clip_inputs(case: ClipCase, dtype, device) -> ClipInputs:
    g = torch.Generator(device="cpu").manual_seed(0)
    i = F.normalize(torch.randn(case.N, case.D, generator=g), dim=-1).to(device, dtype).requires_grad_()
    t = F.normalize(torch.randn(case.N, case.D, generator=g), dim=-1).to(device, dtype).requires_grad_()
    return ClipInputs(i, t, torch.tensor(14.3, device=device, requires_grad=True))


def clip_check(case: ClipCase, inputs: ClipInputs) -> tuple[Optional[bool], str]:
    """genext's loss against the eager loss on the same features."""
    if not case.eager:
        return None, ""
    a, b = clip_loss(*inputs).item(), eager_clip_loss(*inputs).item()
    ok = abs(a - b) <= 2e-2 * max(1.0, abs(b))  # bf16 features: the eager logits are bf16
    return ok, f"loss {a:.5f} vs eager {b:.5f}"


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
        Timing(impl, "f+b", _setup(LOSSES[impl]), warmup, reps, peak_memory=True,
               shows_check=impl == "genext", on_error="failed")  # e.g. out of memory
        for impl in impls)
    return Case(case.name, dtype, timings, lambda inputs: clip_check(case, inputs),
                inputs=lambda: clip_inputs(case, dtype, config.device))


def cases(config: Config) -> list[Case]:
    shapes = device_cases(config, CUDA_CASES, CPU_CASES,
                          quick=lambda s: s[1:2] if config.device == "cuda" else [CPU_QUICK_CASE])
    return [make_case(c, config) for c in shapes]


BENCH = Bench(
    "contrastive",
    "CLIP loss forward + backward: genext vs the eager N x N loss (ms, peak extra MiB on CUDA)",
    cases,
    (Column("clip loss case", "case"), DTYPE, IMPL, Column("f+b ms", "ms", ".3f"), PEAK_MIB),
)
