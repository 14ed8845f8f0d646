"""Attention cases of `genext bench`: genext.ops.flash_attention against PyTorch's SDPA backends.

TFLOP/s count 4*B*H*Lq*Lk*D for the forward (halved when causal) and 3.5 times that for
forward + backward (the backward counted as 2.5 forwards), as ../shared/ANCHORS.md and FlashAttention
report them; the count is the same for every implementation, so the ratios are the time ratios.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .bench import Row, copies_for_l2, time_fn
from .ops import flash_attention


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


# The shapes issue 3 sets targets for (bf16, H100/H200), and small CPU shapes.
ATTN_CUDA_CASES = [
    AttnCase(4, 16, 4096, 4096, 128),
    AttnCase(4, 16, 4096, 4096, 128, causal=True),
    AttnCase(8, 16, 4096, 4096, 64),
    AttnCase(4, 16, 8192, 8192, 128, causal=True),
    AttnCase(2, 8, 4096, 4096, 40),
    AttnCase(2, 8, 4096, 77, 64),
]
ATTN_CPU_CASES = [
    AttnCase(1, 4, 512, 512, 64),
    AttnCase(1, 4, 512, 512, 64, causal=True),
    AttnCase(1, 8, 1024, 77, 40),
]


def _sdpa(backend) -> Callable:
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return fn


def attn_impls(device: str) -> dict[str, Callable]:
    from torch.nn.attention import SDPBackend

    impls = {"genext": lambda q, k, v, causal: flash_attention(q, k, v, causal=causal)}
    if device == "cuda":
        impls["flash"] = _sdpa(SDPBackend.FLASH_ATTENTION)
        impls["cudnn"] = _sdpa(SDPBackend.CUDNN_ATTENTION)
        impls["efficient"] = _sdpa(SDPBackend.EFFICIENT_ATTENTION)
    else:
        impls["sdpa"] = lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return impls


def attn_inputs(case: AttnCase, dtype, device, copies=1, grad=False):
    sets = []
    for _ in range(copies):
        q = torch.randn(case.B, case.H, case.Lq, case.D, device=device, dtype=dtype)
        k = torch.randn(case.B, case.H, case.Lk, case.D, device=device, dtype=dtype)
        v = torch.randn(case.B, case.H, case.Lk, case.D, device=device, dtype=dtype)
        if grad:
            q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
        sets.append((q, k, v, torch.randn_like(q) if grad else None))
    return sets


def attn_check(case: AttnCase, dtype, device) -> tuple[bool, str]:
    """genext's output on one sequence and two heads against float64: no worse than twice the
    error of PyTorch's math path in the same dtype (Lq == Lk here or not causal, so PyTorch's
    top-left causal mask equals genext's bottom-right one)."""
    sub = AttnCase(1, min(case.H, 2), case.Lq, case.Lk, case.D, case.causal)
    q, k, v, _ = attn_inputs(sub, dtype, device)[0]
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=case.causal)
    ours = flash_attention(q, k, v, causal=case.causal)
    if not torch.isfinite(ours).all():
        return False, "non-finite output"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        pt = F.scaled_dot_product_attention(q, k, v, is_causal=case.causal)
    e_ours = (ours.double() - ref).abs().max().item()
    e_pt = (pt.double() - ref).abs().max().item()
    tol = 2 * e_pt + (1e-6 if dtype != torch.float32 else 1e-5)
    return e_ours <= tol, f"max {e_ours:.1e} (math {e_pt:.1e})"


def bench_attention(device: str, dtype: torch.dtype, quick: bool, compile_too: bool,
                    copy_bps: float) -> tuple[list[Row], bool]:
    if dtype == torch.float16 and device == "cuda":
        dtype = torch.bfloat16  # the targets are set in bf16; --dtype float16 is not overridden
    cases = ATTN_CUDA_CASES if device == "cuda" else ATTN_CPU_CASES
    if quick:
        cases = cases[:1] + cases[-1:]
    warmup, reps = (3, 10) if device == "cuda" else (1, 3)
    rows, all_ok = [], True
    for case in cases:
        ok, note = attn_check(case, dtype, device)
        all_ok &= ok
        size = 3 * case.B * case.H * case.Lq * case.D * torch.tensor([], dtype=dtype).element_size()
        n = copies_for_l2(size, device)
        for name, fn in attn_impls(device).items():
            for direction in ("fwd", "f+b"):
                sets = attn_inputs(case, dtype, device, copies=n, grad=direction == "f+b")
                if direction == "fwd":
                    def call(i, sets=sets, fn=fn):
                        q, k, v, _ = sets[i % n]
                        with torch.no_grad():
                            fn(q, k, v, case.causal)
                else:
                    def call(i, sets=sets, fn=fn):
                        q, k, v, g = sets[i % n]
                        torch.autograd.grad(fn(q, k, v, case.causal), (q, k, v), g)
                try:
                    t = time_fn(call, device, warmup, reps)
                except RuntimeError as e:  # a backend that does not take this case
                    rows.append(Row("attention", case.name, str(dtype)[6:], direction, name,
                                    float("nan"), 0.0, 0.0, f"n/a: {str(e).splitlines()[0][:60]}"))
                    continue
                tflops = case.flops(direction) / t / 1e12
                check = (("ok " if ok else "FAIL ") + note) if name == "genext" and direction == "fwd" else ""
                rows.append(Row("attention", case.name, str(dtype)[6:], direction, name, t * 1e3,
                                0.0, 0.0, check, extra={"tflops": tflops}))
                del sets
    return rows, all_ok


def print_attention_table(rows: list[Row]) -> None:
    rows = [r for r in rows if r.op == "attention"]
    if not rows:
        return
    head = f"{'attention case':<24} {'dtype':<9} {'dir':<4} {'impl':<10} {'ms':>9} {'TFLOP/s':>8}  check"
    print(head)
    print("-" * len(head))
    for r in rows:
        tf = r.extra.get("tflops", float("nan"))
        print(f"{r.case:<24} {r.dtype:<9} {r.direction:<4} {r.impl:<10} {r.ms:>9.3f} {tf:>8.1f}  {r.check}")
