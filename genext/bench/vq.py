"""VQ nearest codebook: genext.ops.vq_nearest against ``torch.cdist(z, E).argmin(1)`` (the N x K
matrix PyTorch materialises), genext's indices checked against a float64 brute force and, on
CUDA, the peak extra memory of each."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import reference
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
CPU_CASES = [VQCase(16384, 64, 1024), VQCase(1024, 64, 1024)]
CPU_QUICK_CASE = VQCase(4096, 64, 512)


def vq_inputs(case: VQCase, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """z (N, D) and a codebook (K, D)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(case.N, case.D, generator=g).to(device, dtype)
    return z, torch.randn(case.K, case.D, generator=g).to(device, dtype)


CHECK_ROWS = 512  # rows compared with the float64 brute force (its N x K x D work is large)


def vq_check(inputs) -> tuple[bool | None, str]:
    """genext's indices on the first rows against the float64 brute force over the same (rounded)
    inputs: each pick's squared distance within 1e-5 relative of the best (fp32 accumulation of
    D terms), and at least 99.9% of the picks equal to the float64 argmin (near ties aside). The
    note adds the agreement with cdist + argmin, which computes 16-bit inputs in 16 bits."""
    z, cb = inputs
    rows = z[:CHECK_ROWS]
    idx = vq_nearest(rows, cb)[0]
    zd, cd = rows.double(), cb.double()
    chunk = max(1, (1 << 28) // (cd.numel() * 8))  # about 256 MiB of differences at a time
    scores = torch.cat(
        [reference.vq_scores(zd[i : i + chunk], cd) for i in range(0, len(zd), chunk)]
    )
    best = scores.min(-1).values
    chosen = scores.gather(1, idx.view(-1, 1)).squeeze(1)
    near = bool((chosen <= best * (1 + 1e-5) + 1e-12).all())
    exact = (idx == scores.argmin(-1)).float().mean().item()
    ok = near and exact >= 0.999
    note = f"{100 * exact:.2f}% equal to the float64 argmin{'' if near else ', a pick not near the best'}"
    try:
        same = (vq_nearest(z, cb)[0] == torch.cdist(z, cb).argmin(1)).float().mean().item()
        note += f"; {100 * same:.2f}% equal to cdist+argmin"
    except RuntimeError as e:
        note += f"; cdist failed: {str(e).splitlines()[0][:40]}"
    return ok, note


def make_case(case: VQCase, dtype: torch.dtype, config: Config) -> Case:
    warmup, reps = (2, 10) if config.device == "cuda" else (1, 3)
    calls = {
        "genext": lambda z, cb: vq_nearest(z, cb)[0],
        "cdist": lambda z, cb: torch.cdist(z, cb).argmin(1),
    }
    timings = tuple(
        Timing(
            impl,
            "fwd",
            lambda inputs, fn=fn: lambda i: fn(*inputs),
            warmup,
            reps,
            peak_memory=True,
            shows_check=impl == "genext",
            on_error="n/a" if impl == "cdist" else None,
        )
        for impl, fn in calls.items()
    )
    return Case(
        case.name, dtype, timings, vq_check, inputs=lambda: vq_inputs(case, dtype, config.device)
    )


def cases(config: Config) -> list[Case]:
    shapes = device_cases(
        config,
        CUDA_CASES,
        CPU_CASES,
        quick=lambda s: s[:1] if config.device == "cuda" else [CPU_QUICK_CASE],
    )
    if config.dtype is not None:
        dtypes = [config.dtype]
    else:
        dtypes = [torch.float32] + (
            [torch.bfloat16] if config.device == "cuda" and not config.quick else []
        )
    return [make_case(c, dt, config) for c in shapes for dt in dtypes]


BENCH = Bench(
    "vq",
    "VQ nearest codebook: genext vs cdist + argmin (ms, peak extra MiB on CUDA)",
    cases,
    (Column("vq case", "case"), DTYPE, IMPL, MS, PEAK_MIB),
)
