"""VQ cases of `genext bench`: genext.ops.vq_nearest against `torch.cdist(z, E).argmin(1)` (the
N x K matrix PyTorch materialises), with the indices compared and, on CUDA, the peak extra
memory of each."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .bench import Row, peak_extra_mib, time_fn
from .ops import vq_nearest


@dataclass(frozen=True)
class VQCase:
    N: int
    D: int
    K: int

    @property
    def name(self) -> str:
        return f"N{self.N}D{self.D}K{self.K}"


VQ_CUDA_CASES = [VQCase(65536, 256, 8192), VQCase(262144, 64, 16384)]
VQ_CPU_CASES = [VQCase(16384, 64, 1024)]


def bench_vq(device: str, dtype: torch.dtype, quick: bool, compile_too: bool,
             copy_bps: float) -> tuple[list[Row], bool]:
    cases = VQ_CUDA_CASES if device == "cuda" else VQ_CPU_CASES
    dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
    if quick:
        cases, dtypes = cases[:1], dtypes[:1]
        if device == "cpu":
            cases = [VQCase(4096, 64, 512)]
    warmup, reps = (2, 10) if device == "cuda" else (1, 3)
    rows, all_ok = [], True
    g = torch.Generator(device="cpu").manual_seed(0)
    for case in cases:
        for dt in dtypes:
            z = torch.randn(case.N, case.D, generator=g).to(device, dt)
            cb = torch.randn(case.K, case.D, generator=g).to(device, dt)
            ours = lambda: vq_nearest(z, cb)[0]  # noqa: E731
            theirs = lambda: torch.cdist(z, cb).argmin(1)  # noqa: E731
            try:
                same = (ours() == theirs()).float().mean().item()
            except RuntimeError as e:  # e.g. cdist out of memory
                same, theirs = float("nan"), None
                note = f"cdist failed: {str(e).splitlines()[0][:50]}"
            else:
                ok = same >= 0.999  # equal except near ties within the rounding of cdist's expansion
                all_ok &= ok
                note = f"{'ok' if ok else 'FAIL'} {100 * same:.2f}% equal to cdist+argmin"
            for name, fn in (("genext", ours), ("cdist", theirs)):
                if fn is None:
                    continue
                t = time_fn(lambda i, fn=fn: fn(), device, warmup, reps)
                mib = peak_extra_mib(fn, device)
                rows.append(Row("vq", case.name, str(dt)[6:], "fwd", name, t * 1e3, 0.0, 0.0,
                                note if name == "genext" else "", extra={"peak_extra_MiB": mib}))
            del z, cb
    return rows, all_ok


def print_vq_table(rows: list[Row]) -> None:
    rows = [r for r in rows if r.op == "vq"]
    if not rows:
        return
    head = f"{'vq case':<22} {'dtype':<9} {'impl':<8} {'ms':>9} {'peak MiB':>9}  check"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.case:<22} {r.dtype:<9} {r.impl:<8} {r.ms:>9.3f} "
              f"{r.extra.get('peak_extra_MiB', float('nan')):>9.1f}  {r.check}")
