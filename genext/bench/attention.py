"""Attention: genext.ops.flash_attention against PyTorch's SDPA backends (flash, cuDNN,
memory-efficient on CUDA; PyTorch's default on the CPU), forward and forward + backward.

TFLOP/s count 4*B*H*Lq*Lk*D for the forward (halved when causal) and 3.5 times that for
forward + backward (the backward counted as 2.5 forwards), as ../shared/ANCHORS.md and FlashAttention
report them; the count is the same for every implementation, so the ratios are the time ratios.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import reference
from ..ops import flash_attention
from ..ops.flash_attention import cpu_forward_prefers_torch
from .harness import copies_for_l2
from .registry import (
    DIRECTION,
    DTYPE,
    IMPL,
    MS,
    TFLOPS,
    Bench,
    Case,
    Column,
    Config,
    Timing,
    device_cases,
)


@dataclass(frozen=True)
class AttnCase:
    B: int
    H: int
    Lq: int
    Lk: int
    D: int
    causal: bool = False

    @property
    def name(self) -> str:
        lens = f"L{self.Lq}" if self.Lq == self.Lk else f"Lq{self.Lq}Lk{self.Lk}"
        return f"B{self.B}H{self.H}{lens}D{self.D}" + ("-causal" if self.causal else "")

    def flops(self, direction: str) -> float:
        f = 4.0 * self.B * self.H * self.Lq * self.Lk * self.D / (2 if self.causal else 1)
        return f * (3.5 if direction == "f+b" else 1.0)


# CUDA: the shapes the H100/H200 targets are set for (bf16). CPU (fp32): a Stable Diffusion
# U-Net's self- and cross-attention at a 32x32 latent (8 heads of 40, 80, 160), a small Llama's
# causal prefill, the larger self-attentions the CPU kernel must keep up with, and the narrow
# heads of the small test U-Nets (the ldm bench's: 8 heads of 8 at 16x16 with guidance).
CUDA_CASES = [
    AttnCase(4, 16, 4096, 4096, 128),
    AttnCase(4, 16, 4096, 4096, 128, causal=True),
    AttnCase(8, 16, 4096, 4096, 64),
    AttnCase(4, 16, 8192, 8192, 128, causal=True),
    AttnCase(2, 8, 4096, 4096, 40),
    AttnCase(2, 8, 4096, 77, 64),
]
CPU_CASES = [
    AttnCase(1, 4, 512, 512, 64, causal=True),
    AttnCase(2, 8, 1024, 1024, 40),
    AttnCase(2, 8, 1024, 77, 40),
    AttnCase(2, 8, 256, 256, 80),
    AttnCase(2, 8, 64, 64, 160),
    AttnCase(4, 8, 512, 512, 128),
    AttnCase(1, 16, 2048, 2048, 64),
    AttnCase(2, 8, 256, 256, 8),
]
DIRECTIONS = ("fwd", "f+b")


def _sdpa(backend) -> Callable:
    def fn(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return fn


def attn_impls(device: str) -> dict[str, Callable]:
    """fn(q, k, v, causal) of genext and of each SDPA backend that runs on the device."""
    impls = {"genext": lambda q, k, v, causal: flash_attention(q, k, v, causal=causal)}
    if device == "cuda":
        impls["flash"] = _sdpa(SDPBackend.FLASH_ATTENTION)
        impls["cudnn"] = _sdpa(SDPBackend.CUDNN_ATTENTION)
        impls["efficient"] = _sdpa(SDPBackend.EFFICIENT_ATTENTION)
    else:
        impls["sdpa"] = lambda q, k, v, causal: F.scaled_dot_product_attention(
            q, k, v, is_causal=causal
        )
    return impls


def attn_inputs(case: AttnCase, dtype, device, copies=1, grad=False):
    """`copies` independent (q, k, v, grad_out) sets, (B, H, L, D)."""
    sets = []
    for _ in range(copies):
        q = torch.randn(case.B, case.H, case.Lq, case.D, device=device, dtype=dtype)
        k = torch.randn(case.B, case.H, case.Lk, case.D, device=device, dtype=dtype)
        v = torch.randn(case.B, case.H, case.Lk, case.D, device=device, dtype=dtype)
        if grad:
            q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
        sets.append((q, k, v, torch.randn_like(q) if grad else None))
    return sets


def attn_call(case: AttnCase, fn: Callable, sets: list, direction: str) -> Callable[[int], None]:
    """The call to time: forward without autograd, or forward + backward, rotating over sets."""
    n = len(sets)
    if direction == "fwd":

        def call(i):
            q, k, v, _ = sets[i % n]
            with torch.no_grad():
                fn(q, k, v, case.causal)
    else:

        def call(i):
            q, k, v, g = sets[i % n]
            torch.autograd.grad(fn(q, k, v, case.causal), (q, k, v), g)

    return call


def attn_check(case: AttnCase, dtype, device) -> tuple[bool, str]:
    """genext's kernel's output on one sequence and two heads against the float64 reference: no
    worse than twice the error of PyTorch's math path in the same dtype (Lq == Lk here or not
    causal, so the math path's top-left causal mask equals the bottom-right one of genext and the
    reference). return_lse keeps the call on genext's kernel where the timed rows may be routed
    to SDPA."""
    sub = AttnCase(1, min(case.H, 2), case.Lq, case.Lk, case.D, case.causal)
    q, k, v, _ = attn_inputs(sub, dtype, device)[0]
    ref = reference.attention_reference(q.double(), k.double(), v.double(), causal=case.causal)
    ours, _ = flash_attention(q, k, v, causal=case.causal, return_lse=True)
    if not torch.isfinite(ours).all():
        return False, "non-finite output"
    with sdpa_kernel(SDPBackend.MATH):
        pt = F.scaled_dot_product_attention(q, k, v, is_causal=case.causal)
    e_ours = (ours.double() - ref).abs().max().item()
    e_pt = (pt.double() - ref).abs().max().item()
    tol = 2 * e_pt + (1e-6 if dtype != torch.float32 else 1e-5)
    return e_ours <= tol, f"max {e_ours:.1e} (math {e_pt:.1e})"


def _setup(case: AttnCase, fn: Callable, dtype, device: str, direction: str):
    size = 3 * case.B * case.H * case.Lq * case.D * dtype.itemsize
    sets = attn_inputs(
        case, dtype, device, copies=copies_for_l2(size, device), grad=direction == "f+b"
    )
    return attn_call(case, fn, sets, direction)


def routed_to_sdpa(case: AttnCase, dtype, device: str, direction: str) -> bool:
    """Whether genext's flash_attention hands this case and direction to PyTorch's SDPA, where
    that is the faster path (its table row then times SDPA: read its speed as 1.0x and noise)."""
    if device != "cpu":
        return False
    grad = direction == "f+b"

    def like(length: int) -> torch.Tensor:  # the case's shape without its memory
        base = torch.empty(1, 1, 1, 1, dtype=dtype, requires_grad=grad)
        return base.expand(case.B, case.H, length, case.D)

    with torch.set_grad_enabled(grad):
        return cpu_forward_prefers_torch(
            like(case.Lq), like(case.Lk), like(case.Lk), causal=case.causal
        )


def make_case(case: AttnCase, config: Config) -> Case:
    # the targets are set in bf16
    dtype = config.dtype_or(torch.bfloat16 if config.device == "cuda" else torch.float32)
    # CPU: nine timed calls (five swung a row by 10-20% on a shared machine)
    warmup, reps = (3, 10) if config.device == "cuda" else (2, 9)
    timings = tuple(
        Timing(
            "genext (sdpa)"
            if impl == "genext" and routed_to_sdpa(case, dtype, config.device, d)
            else impl,
            d,
            lambda _, fn=fn, d=d: _setup(case, fn, dtype, config.device, d),
            warmup,
            reps,
            flops=case.flops(d),
            on_error="n/a",  # a backend may not take a case
            shows_check=impl == "genext" and d == "fwd",
        )
        for impl, fn in attn_impls(config.device).items()
        for d in DIRECTIONS
    )
    return Case(case.name, dtype, timings, lambda _: attn_check(case, dtype, config.device))


def cases(config: Config) -> list[Case]:
    return [make_case(c, config) for c in device_cases(config, CUDA_CASES, CPU_CASES)]


BENCH = Bench(
    "attention",
    "flash attention: genext vs PyTorch's SDPA backends, fwd and f+b (TFLOP/s)",
    cases,
    (Column("attention case", "case"), DTYPE, DIRECTION, IMPL, MS, TFLOPS),
)
