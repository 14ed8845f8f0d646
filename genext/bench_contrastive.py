"""Contrastive-loss cases of `genext bench`: genext.ops.clip_loss forward+backward against the
eager loss that builds the N x N logits (open_clip's formula), with the loss values compared and,
on CUDA, each one's peak memory beyond its inputs."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .bench import Row, peak_extra_mib, time_fn
from .ops import clip_loss


@dataclass(frozen=True)
class ClipCase:
    N: int
    D: int
    eager: bool = True  # False: too large for the N x N logits, genext alone

    @property
    def name(self) -> str:
        return f"N{self.N}D{self.D}"


CLIP_CUDA_CASES = [ClipCase(32768, 768), ClipCase(8192, 512), ClipCase(1048576, 512, eager=False)]
CLIP_CPU_CASES = [ClipCase(4096, 512)]


def eager_clip_loss(i, t, s):
    logits = s * i @ t.T
    labels = torch.arange(i.shape[0], device=i.device)
    return 0.5 * (F.cross_entropy(logits.float(), labels) + F.cross_entropy(logits.T.float(), labels))


def bench_contrastive(device: str, dtype: torch.dtype, quick: bool, compile_too: bool,
                      copy_bps: float) -> tuple[list[Row], bool]:
    cases = CLIP_CUDA_CASES if device == "cuda" else CLIP_CPU_CASES
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    if quick:
        cases = [ClipCase(1024, 128)] if device == "cpu" else cases[1:2]
    warmup, reps = (2, 5) if device == "cuda" else (1, 3)
    rows, all_ok = [], True
    g = torch.Generator(device="cpu").manual_seed(0)
    for case in cases:
        i = F.normalize(torch.randn(case.N, case.D, generator=g), dim=-1).to(device, dt).requires_grad_()
        t = F.normalize(torch.randn(case.N, case.D, generator=g), dim=-1).to(device, dt).requires_grad_()
        s = torch.tensor(14.3, device=device, requires_grad=True)
        impls = {"genext": lambda: clip_loss(i, t, s)}
        if case.eager:
            impls["eager"] = lambda: eager_clip_loss(i, t, s)
        note = ""
        if case.eager:
            a, b = impls["genext"]().item(), impls["eager"]().item()
            ok = abs(a - b) <= 2e-2 * max(1.0, abs(b))  # bf16 features: the eager logits are bf16
            all_ok &= ok
            note = f"{'ok' if ok else 'FAIL'} loss {a:.5f} vs eager {b:.5f}"
        for name, fn in impls.items():
            def step(_i, fn=fn):
                fn().backward()
            try:
                ms = time_fn(step, device, warmup, reps) * 1e3
                mib = peak_extra_mib(lambda: step(0), device)
            except RuntimeError as e:  # e.g. out of memory
                rows.append(Row("contrastive", case.name, str(dt)[6:], "f+b", name, float("nan"), 0.0,
                                0.0, f"failed: {str(e).splitlines()[0][:50]}"))
                continue
            rows.append(Row("contrastive", case.name, str(dt)[6:], "f+b", name, ms, 0.0, 0.0,
                            note if name == "genext" else "", extra={"peak_extra_MiB": mib}))
        del i, t
    return rows, all_ok


def print_contrastive_table(rows: list[Row]) -> None:
    rows = [r for r in rows if r.op == "contrastive"]
    if not rows:
        return
    head = f"{'clip loss case':<16} {'dtype':<9} {'impl':<8} {'f+b ms':>9} {'peak MiB':>9}  check"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.case:<16} {r.dtype:<9} {r.impl:<8} {r.ms:>9.3f} "
              f"{r.extra.get('peak_extra_MiB', float('nan')):>9.1f}  {r.check}")
