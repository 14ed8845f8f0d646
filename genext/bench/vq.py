"""VQ nearest codebook: genext.ops.vq_nearest against ``torch.cdist(z, E).argmin(1)`` (the N x K
matrix PyTorch materialises), with the indices compared and, on CUDA, the peak extra memory of
each."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..ops import vq_nearest
from .registry import DTYPE, IMPL, MS, PEAK_MIB, Bench, Case, Column, Config, Timing, device_cases


@dataclass(frozen=True)
class VQCase:
    N: int
    D: int
    K: int

    @property
    def name(self) -> str:
        return f"N{self.N}D{self.D}K{self.K}"


CUDA_CASES = [VQCase(65536, 256, 8192), VQCase(262144, 64, 16384)]
CPU_CASES = [VQCase(16384, 64, 1024)]
CPU_QUICK_CASE = VQCase(4096, 64, 512)


def vq_inputs(case: VQCase, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """z (N, D) and a codebook (K, D)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(case.N, case.D, generator=g).to(device, dtype)
    return z, torch.randn(case.K, case.D, generator=g).to(device, dtype)


def vq_check(inputs) -> tuple[Optional[bool], str]:
    """genext's indices against cdist + argmin's: equal except near ties within the rounding of
    cdist's expansion (not compared when cdist fails, e.g. out of memory)."""
    z, cb = inputs
    try:
        same = (vq_nearest(z, cb)[0] == torch.cdist(z, cb).argmin(1)).float().mean().item()
    except RuntimeError as e:
        return None, f"cdist failed: {str(e).splitlines()[0][:50]}"
    return same >= 0.999, f"{100 * same:.2f}% equal to cdist+argmin"


def make_case(case: VQCase, dtype: torch.dtype, config: Config) -> Case:
    warmup, reps = (2, 10) if config.device == "cuda" else (1, 3)
    calls = {"genext": lambda z, cb: vq_nearest(z, cb)[0],
             "cdist": lambda z, cb: torch.cdist(z, cb).argmin(1)}
    timings = tuple(
        Timing(impl, "fwd", lambda inputs, fn=fn: lambda i: fn(*inputs), warmup, reps, peak_memory=True,
               shows_check=impl == "genext", on_error="n/a" if impl == "cdist" else None)
        for impl, fn in calls.items())
    return Case(case.name, dtype, timings, vq_check, inputs=lambda: vq_inputs(case, dtype, config.device))


def cases(config: Config) -> list[Case]:
    shapes = device_cases(config, CUDA_CASES, CPU_CASES,
                          quick=lambda s: s[:1] if config.device == "cuda" else [CPU_QUICK_CASE])
    dtypes = [torch.float32] + ([torch.bfloat16] if config.device == "cuda" and not config.quick else [])
    return [make_case(c, dt, config) for c in shapes for dt in dtypes]


BENCH = Bench(
    "vq",
    "VQ nearest codebook: genext vs cdist + argmin (ms, peak extra MiB on CUDA)",
    cases,
    (Column("vq case", "case"), DTYPE, IMPL, MS, PEAK_MIB),
)
