"""Sampler cases of `genext bench`: a scheduler step of genext.samplers against the same step of
diffusers (when installed), and the step's expression run eagerly and under torch.compile.

Per-step times are a 50-step sampling loop's time divided by 50 (the model output is a fixed
tensor, so the loop is all scheduler). Bytes per step: the sample, the model output (twice with
guidance), the DPM history read, the new sample and x0 written. On CUDA the loop is also timed
captured in a CUDA graph and replayed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .bench import Row, time_fn
from .ops._sampler_step import StepKind, sampler_step
from .reference import sampler_step as eager_step

STEPS = 50


@dataclass(frozen=True)
class SamplerCase:
    scheduler: str  # "ddim" or "dpm2m"
    shape: tuple[int, ...]
    guidance: bool = False

    @property
    def name(self) -> str:
        return f"{self.scheduler}-{'x'.join(map(str, self.shape))}" + ("-cfg" if self.guidance else "")

    def step_bytes(self, itemsize: int) -> int:
        n = 1
        for s in self.shape:
            n *= s
        reads = 1 + (2 if self.guidance else 1) + (1 if self.scheduler == "dpm2m" else 0)
        return n * itemsize * (reads + 2)


SD_LATENT = (2, 4, 64, 64)
SAMPLER_CASES = [SamplerCase(s, SD_LATENT, g) for s in ("ddim", "dpm2m") for g in (False, True)]
SAMPLER_CUDA_BANDWIDTH_CASES = [SamplerCase("ddim", (8, 16, 256, 256)),
                                SamplerCase("dpm2m", (8, 16, 256, 256))]


def _schedulers(kind: str):
    """(genext scheduler, diffusers scheduler or None) with the same config."""
    from . import samplers

    cfg = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
               beta_schedule="scaled_linear")
    ours_cls = samplers.DDIMScheduler if kind == "ddim" else samplers.DPMSolverMultistepScheduler
    extra = {} if kind == "ddim" else dict(solver_order=2, algorithm_type="dpmsolver++")
    ours = ours_cls(**cfg, **extra)
    try:
        import diffusers
    except ImportError:
        return ours, None
    theirs_cls = diffusers.DDIMScheduler if kind == "ddim" else diffusers.DPMSolverMultistepScheduler
    return ours, theirs_cls(**cfg, **extra)


def _loop(sched, sample: torch.Tensor, model_out: torch.Tensor, guidance: bool, fused: bool):
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


def _time_loop(fn: Callable[[], object], device: str, reps: int) -> float:
    fn()  # warm-up (and first-step index lookups)
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _graph_loop_time(sched, sample, model_out, guidance: bool, reps: int) -> Optional[float]:
    """A 50-step genext loop captured in a CUDA graph, replayed; None when capture fails."""
    try:
        x = sample.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            _loop(sched, x, model_out, guidance, True)
        torch.cuda.current_stream().wait_stream(side)
        sched.set_timesteps(STEPS, device=sample.device)
        graph = torch.cuda.CUDAGraph()
        ts = list(sched.timesteps)
        with torch.cuda.graph(graph):
            y = x
            for t in ts:
                y = (sched.step(model_out, t, y, guidance_scale=7.5) if guidance
                     else sched.step(model_out, t, y)).prev_sample
        return _time_loop(graph.replay, "cuda", reps)
    except Exception:  # noqa: BLE001  (reported as n/a)
        return None


def bench_samplers(device: str, dtype: torch.dtype, quick: bool, compile_too: bool,
                   copy_bps: float) -> tuple[list[Row], bool]:
    dtype = torch.float32  # the targets are set for fp32 samples
    cases = list(SAMPLER_CASES) + (SAMPLER_CUDA_BANDWIDTH_CASES if device == "cuda" else [])
    if quick:
        cases = cases[:1]
    reps = 3 if quick else (10 if device == "cuda" else 5)
    rows: list[Row] = []
    all_ok = True
    g = torch.Generator(device="cpu").manual_seed(0)
    for case in cases:
        sample = torch.randn(case.shape, generator=g).to(device, dtype)
        model_out = torch.randn(((2 * case.shape[0]),) + case.shape[1:] if case.guidance else case.shape,
                                generator=g).to(device, dtype)
        nbytes = case.step_bytes(4)
        ours, theirs = _schedulers(case.scheduler)
        impls = {"genext": lambda: _loop(ours, sample, model_out, case.guidance, True)}
        check = "no diffusers"
        if theirs is not None:
            impls["diffusers"] = lambda: _loop(theirs, sample, model_out, case.guidance, False)
            a, b = impls["genext"]().double(), impls["diffusers"]().double()
            err = ((a - b).norm() / b.norm()).item()
            good = err <= (1e-6 if device == "cpu" else 1e-5)
            all_ok &= good
            check = f"{'ok' if good else 'FAIL'} rel {err:.1e} vs diffusers"
        for name, fn in impls.items():
            t = _time_loop(fn, device, reps) / STEPS
            rows.append(Row("sampler", case.name, "float32", "step", name, t * 1e3, nbytes / t / 1e9,
                            100 * nbytes / t / copy_bps, check if name == "genext" else ""))
        if device == "cuda":
            t = _graph_loop_time(ours, sample, model_out, case.guidance, reps)
            if t is not None:
                t /= STEPS
                rows.append(Row("sampler", case.name, "float32", "step", "genext-graph", t * 1e3,
                                nbytes / t / 1e9, 100 * nbytes / t / copy_bps))
        # the step's expression alone: the kernel vs eager PyTorch vs torch.compile
        mode = StepKind.DDIM if case.scheduler == "ddim" else StepKind.DPM
        hist = [torch.randn_like(sample)] if mode == StepKind.DPM else []
        coef = [0.9, 0.4, 1.0, 0.95, 0.3, 0.0, 0.0, 0.0, 1.7, 0.0, 0.0, 0.0]
        kw = dict(history=hist, guidance_scale=7.5 if case.guidance else None)
        exprs = {"kernel": lambda: sampler_step(mode, sample, model_out, coef, **kw),
                 "eager": lambda: eager_step(mode, sample, model_out, coef, **kw)}
        if compile_too:
            compiled = torch.compile(lambda s, m, h: eager_step(mode, s, m, coef, history=h,
                                                                guidance_scale=kw["guidance_scale"]))
            exprs["compile"] = lambda: compiled(sample, model_out, hist)
        for name, fn in exprs.items():
            t = time_fn(lambda i, fn=fn: fn(), device, 3, 20 if device == "cuda" else 10)
            rows.append(Row("sampler", case.name, "float32", "expr", name, t * 1e3, nbytes / t / 1e9,
                            100 * nbytes / t / copy_bps))
    return rows, all_ok


def print_sampler_table(rows: list[Row]) -> None:
    rows = [r for r in rows if r.op == "sampler"]
    if not rows:
        return
    head = (f"{'sampler case':<30} {'what':<5} {'impl':<13} {'us/step':>9} {'GB/s':>8} {'%copy':>6}"
            "  check")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.case:<30} {r.direction:<5} {r.impl:<13} {r.ms * 1e3:>9.1f} {r.gbps:>8.1f} "
              f"{r.pct_copy:>6.1f}  {r.check}")
