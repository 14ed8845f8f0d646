"""Diffusion sampler step: a scheduler step of genext.samplers against the same step of diffusers
(when installed), and the step's expression alone: the kernel vs eager PyTorch vs torch.compile.

Per-step times of the "step" rows are a 50-step sampling loop's time divided by 50, on the host
clock (the model output is a fixed tensor, so the loop is all scheduler, Python included). Bytes
per step: the sample, the model output (twice with guidance), the DPM history read, the new
sample and x0 written. On CUDA the genext loop is also timed captured in a CUDA graph and replayed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .. import reference, samplers
from ..ops._sampler_step import StepKind, sampler_step
from .registry import GBPS, IMPL, PCT_COPY, Bench, Case, Column, Config, Timing, device_cases

STEPS = 50
COEF = [0.9, 0.4, 1.0, 0.95, 0.3, 0.0, 0.0, 0.0, 1.7, 0.0, 0.0, 0.0]  # of the expression rows


@dataclass(frozen=True)
class SamplerCase:
    scheduler: str  # "ddim" or "dpm2m"
    shape: tuple[int, ...]
    guidance: bool = False

    @property
    def name(self) -> str:
        return f"{self.scheduler}-{'x'.join(map(str, self.shape))}" + (
            "-cfg" if self.guidance else ""
        )

    def step_bytes(self, itemsize: int) -> int:
        reads = 1 + (2 if self.guidance else 1) + (1 if self.scheduler == "dpm2m" else 0)
        return math.prod(self.shape) * itemsize * (reads + 2)


SD_LATENT = (2, 4, 64, 64)
CASES = [SamplerCase(s, SD_LATENT, g) for s in ("ddim", "dpm2m") for g in (False, True)]
CUDA_BANDWIDTH_CASES = [
    SamplerCase("ddim", (8, 16, 256, 256)),
    SamplerCase("dpm2m", (8, 16, 256, 256)),
]


def diffusers_missing() -> str | None:
    """Why diffusers cannot be imported here (None when it can)."""
    try:
        import diffusers  # noqa: F401
    except ImportError as e:
        return f"{type(e).__name__}: {e}"
    return None


def schedulers(kind: str):
    """(genext scheduler, diffusers scheduler or None) with the same config."""
    cfg = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    ours_cls = samplers.DDIMScheduler if kind == "ddim" else samplers.DPMSolverMultistepScheduler
    extra = {} if kind == "ddim" else dict(solver_order=2, algorithm_type="dpmsolver++")
    ours = ours_cls(**cfg, **extra)
    if diffusers_missing() is not None:
        return ours, None
    import diffusers

    theirs_cls = (
        diffusers.DDIMScheduler if kind == "ddim" else diffusers.DPMSolverMultistepScheduler
    )
    return ours, theirs_cls(**cfg, **extra)


class SamplerInputs(NamedTuple):
    sample: torch.Tensor
    model_out: torch.Tensor  # (2B, ...) with guidance: unconditional and conditional halves
    ours: Any  # the genext scheduler
    theirs: Any  # the diffusers scheduler, or None


def sampler_inputs(case: SamplerCase, device: str) -> SamplerInputs:
    g = torch.Generator(device="cpu").manual_seed(0)
    sample = torch.randn(case.shape, generator=g).to(device)
    out_shape = ((2 * case.shape[0]),) + case.shape[1:] if case.guidance else case.shape
    model_out = torch.randn(out_shape, generator=g).to(device)
    return SamplerInputs(sample, model_out, *schedulers(case.scheduler))


def sampling_loop(
    sched, sample: torch.Tensor, model_out: torch.Tensor, guidance: bool, fused: bool
):
    """One 50-step loop; guidance fused into genext's step, done outside for diffusers."""
    sched.set_timesteps(STEPS, device=sample.device)
    x = sample
    for t in sched.timesteps:
        if guidance and fused:
            x = sched.step(model_out, t, x, guidance_scale=7.5).prev_sample
        elif guidance:
            u, c = model_out.chunk(2)
            x = sched.step(u + 7.5 * (c - u), t, x).prev_sample
        else:
            x = sched.step(model_out, t, x).prev_sample
    return x


def sampler_check(case: SamplerCase, inputs: SamplerInputs, device: str) -> tuple[bool | None, str]:
    """genext's 50-step trajectory against diffusers' on the same inputs (relative norm)."""
    if inputs.theirs is None:
        return None, (
            "comparison against diffusers skipped: diffusers is not importable "
            f"({diffusers_missing()}); `pip install diffusers` to check genext's steps against it"
        )
    a = sampling_loop(inputs.ours, inputs.sample, inputs.model_out, case.guidance, True).double()
    b = sampling_loop(inputs.theirs, inputs.sample, inputs.model_out, case.guidance, False).double()
    err = ((a - b).norm() / b.norm()).item()
    return err <= (1e-6 if device == "cpu" else 1e-5), f"rel {err:.1e} vs diffusers"


def _loop_setup(guidance: bool, fused: bool, scheduler: str):
    def setup(inputs: SamplerInputs):
        sched = getattr(inputs, scheduler)
        return lambda i: sampling_loop(sched, inputs.sample, inputs.model_out, guidance, fused)

    return setup


def _graph_setup(guidance: bool):
    def setup(inputs: SamplerInputs) -> Callable[[int], object] | None:
        """A 50-step genext loop captured in a CUDA graph, replayed; None when capture fails."""
        sched, model_out = inputs.ours, inputs.model_out
        try:
            x = inputs.sample.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                sampling_loop(sched, x, model_out, guidance, True)
            torch.cuda.current_stream().wait_stream(side)
            sched.set_timesteps(STEPS, device=x.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = x
                for t in list(sched.timesteps):
                    y = (
                        sched.step(model_out, t, y, guidance_scale=7.5)
                        if guidance
                        else sched.step(model_out, t, y)
                    ).prev_sample
        except Exception:  # noqa: BLE001  (the row is left out)
            return None
        return lambda i: graph.replay()

    return setup


def _expr_setup(case: SamplerCase, impl: str):
    """The step's expression alone on the case's tensors: the kernel, eager, or compiled."""
    mode = StepKind.DDIM if case.scheduler == "ddim" else StepKind.DPM
    scale = 7.5 if case.guidance else None

    def setup(inputs: SamplerInputs):
        sample, model_out = inputs.sample, inputs.model_out
        hist = [torch.randn_like(sample)] if mode == StepKind.DPM else []
        if impl == "kernel":
            return lambda i: sampler_step(
                mode, sample, model_out, COEF, history=hist, guidance_scale=scale
            )
        if impl == "eager":
            return lambda i: reference.sampler_step(
                mode, sample, model_out, COEF, history=hist, guidance_scale=scale
            )
        compiled = torch.compile(
            lambda s, m, h: reference.sampler_step(
                mode, s, m, COEF, history=h, guidance_scale=scale
            )
        )
        return lambda i: compiled(sample, model_out, hist)

    return setup


def make_case(case: SamplerCase, config: Config) -> Case:
    device = config.device
    reps = 3 if config.quick else (10 if device == "cuda" else 5)
    nbytes = case.step_bytes(4)
    loop = dict(warmup=1, reps=reps, nbytes=nbytes, units=STEPS, clock="host")
    timings = [
        Timing("genext", "step", _loop_setup(case.guidance, True, "ours"), shows_check=True, **loop)
    ]
    if diffusers_missing() is None:
        timings.append(
            Timing("diffusers", "step", _loop_setup(case.guidance, False, "theirs"), **loop)
        )
    if device == "cuda":
        timings.append(Timing("genext-graph", "step", _graph_setup(case.guidance), **loop))
    exprs = ["kernel", "eager"] + (["compile"] if config.compile else [])
    timings += [
        Timing(
            impl, "expr", _expr_setup(case, impl), 3, 20 if device == "cuda" else 10, nbytes=nbytes
        )
        for impl in exprs
    ]
    # the targets are set for fp32 samples
    return Case(
        case.name,
        torch.float32,
        tuple(timings),
        lambda inputs: sampler_check(case, inputs, device),
        inputs=lambda: sampler_inputs(case, device),
    )


def cases(config: Config) -> list[Case]:
    shapes = device_cases(config, CASES + CUDA_BANDWIDTH_CASES, CASES, quick=lambda s: s[:1])
    return [make_case(c, config) for c in shapes]


BENCH = Bench(
    "sampler",
    "diffusion sampler step: genext vs diffusers (50-step loop), and the step expression "
    "kernel vs eager vs torch.compile (GB/s, % of copy)",
    cases,
    (
        Column("sampler case", "case"),
        Column("what", "direction"),
        IMPL,
        Column("us/step", lambda r: r.ms * 1e3, ".1f"),
        GBPS,
        PCT_COPY,
    ),
)
