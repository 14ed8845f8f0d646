"""KV-cache decode cases of `genext bench`: genext.ops.attention_with_kvcache against PyTorch SDPA
(`enable_gqa=True`, every backend that takes the case) reading the same cache.

The figure of merit is the rate at which K and V are read: 2 * B * Hk * Lk * D * itemsize bytes
per call over the time, and that rate as a share of the device's copy bandwidth (read + write),
as ../shared/ANCHORS.md reports it. Lq = 1 and no append, so both sides do the same work.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .bench import Row, time_fn
from .ops import attention_with_kvcache


@dataclass(frozen=True)
class DecodeCase:
    B: int
    Hq: int
    Hk: int
    Lk: int
    D: int
    block_size: Optional[int] = None  # paged when set

    @property
    def name(self) -> str:
        s = f"B{self.B}Hq{self.Hq}Hk{self.Hk}Lk{self.Lk}D{self.D}"
        return s + (f"-paged{self.block_size}" if self.block_size else "")

    def kv_bytes(self, itemsize: int) -> int:
        return 2 * self.B * self.Hk * self.Lk * self.D * itemsize


# Issue 4's cases (H100/H200, bf16) and small CPU cases.
DECODE_CUDA_CASES = [
    DecodeCase(16, 32, 8, 8192, 128),
    DecodeCase(1, 32, 8, 32768, 128),
    DecodeCase(64, 32, 8, 2048, 128),
    DecodeCase(16, 32, 8, 8192, 128, block_size=16),
    DecodeCase(16, 32, 8, 8192, 128, block_size=256),
]
DECODE_CPU_CASES = [
    DecodeCase(4, 8, 2, 2048, 64),
    DecodeCase(4, 8, 2, 2048, 64, block_size=16),
]


def decode_inputs(case: DecodeCase, dtype, device):
    """q (B, 1, Hq, D), caches holding Lk tokens per sequence (contiguous, or paged with the blocks
    of each sequence scattered over the pool), lengths, block table (or None)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(case.B, 1, case.Hq, case.D, generator=g).to(device, dtype)
    seqlens = torch.full((case.B,), case.Lk, dtype=torch.int32, device=device)
    if case.block_size is None:
        k = torch.randn(case.B, case.Lk, case.Hk, case.D, generator=g).to(device, dtype)
        v = torch.randn(case.B, case.Lk, case.Hk, case.D, generator=g).to(device, dtype)
        return q, k, v, seqlens, None
    per_seq = -(-case.Lk // case.block_size)
    nblocks = case.B * per_seq
    k = torch.randn(nblocks, case.block_size, case.Hk, case.D, generator=g).to(device, dtype)
    v = torch.randn(nblocks, case.block_size, case.Hk, case.D, generator=g).to(device, dtype)
    table = torch.randperm(nblocks, generator=g).view(case.B, per_seq).to(device, torch.int32)
    return q, k, v, seqlens, table


def gather_cache(k: torch.Tensor, table: Optional[torch.Tensor], lk: int) -> torch.Tensor:
    """The cache as (B, Hk, Lk, D) for SDPA (a view when contiguous, a gather when paged)."""
    if table is None:
        return k[:, :lk].transpose(1, 2)
    b = table.shape[0]
    blocks = k[table.long()]  # (B, per_seq, bs, Hk, D)
    return blocks.reshape(b, -1, k.shape[2], k.shape[3])[:, :lk].transpose(1, 2)


def _sdpa_impls(device: str) -> dict[str, Callable]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def make(backend):
        def fn(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return fn

    if device != "cuda":
        return {"sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)}
    return {"sdpa-flash": make(SDPBackend.FLASH_ATTENTION), "sdpa-cudnn": make(SDPBackend.CUDNN_ATTENTION),
            "sdpa-efficient": make(SDPBackend.EFFICIENT_ATTENTION), "sdpa-math": make(SDPBackend.MATH)}


def decode_check(case: DecodeCase, dtype, device) -> tuple[bool, str]:
    """genext on two sequences against float64 SDPA on the same cache: no worse than twice the
    error of PyTorch's math path in the same dtype."""
    small = DecodeCase(min(case.B, 2), case.Hq, case.Hk, min(case.Lk, 4096), case.D, case.block_size)
    q, k, v, lens, table = decode_inputs(small, dtype, device)
    ours = attention_with_kvcache(q, k, v, lens, causal=True, block_table=table, check_values=False)
    kk, vv = gather_cache(k, table, small.Lk), gather_cache(v, table, small.Lk)
    qq = q.transpose(1, 2)
    ref = F.scaled_dot_product_attention(qq.double(), kk.double(), vv.double(), enable_gqa=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        pt = F.scaled_dot_product_attention(qq, kk, vv, enable_gqa=True)
    if not torch.isfinite(ours).all():
        return False, "non-finite output"
    e_ours = (ours.transpose(1, 2).double() - ref).abs().max().item()
    e_pt = (pt.double() - ref).abs().max().item()
    tol = 2 * e_pt + (1e-6 if dtype != torch.float32 else 1e-5)
    return e_ours <= tol, f"max {e_ours:.1e} (math {e_pt:.1e})"


def bench_kvcache(device: str, dtype: torch.dtype, quick: bool, compile_too: bool,
                  copy_bps: float) -> tuple[list[Row], bool]:
    if dtype == torch.float16 and device == "cuda":
        dtype = torch.bfloat16  # the targets are set in bf16
    cases = DECODE_CUDA_CASES if device == "cuda" else DECODE_CPU_CASES
    if quick:
        cases = cases[:1]
    warmup, reps = (5, 30) if device == "cuda" else (1, 3)
    rows, all_ok = [], True
    item = torch.tensor([], dtype=dtype).element_size()
    for case in cases:
        ok, note = decode_check(case, dtype, device)
        all_ok &= ok
        q, k, v, lens, table = decode_inputs(case, dtype, device)
        nbytes = case.kv_bytes(item)
        impls: dict[str, Callable] = {
            # no host-side value checks: they would add a device sync to every timed call
            "genext": lambda: attention_with_kvcache(q, k, v, lens, causal=True, block_table=table,
                                                     check_values=False)
        }
        kk, vv = gather_cache(k, table, case.Lk), gather_cache(v, table, case.Lk)
        qq = q.transpose(1, 2)
        for name, fn in _sdpa_impls(device).items():
            impls[name] = (lambda fn=fn: fn(qq, kk, vv))
        for name, fn in impls.items():
            try:
                with torch.no_grad():
                    t = time_fn(lambda i, fn=fn: fn(), device, warmup, reps)
            except RuntimeError as e:  # a backend that does not take this case
                rows.append(Row("kvcache", case.name, str(dtype)[6:], "fwd", name, float("nan"), 0.0,
                                0.0, f"n/a: {str(e).splitlines()[0][:60]}"))
                continue
            bps = nbytes / t
            check = (("ok " if ok else "FAIL ") + note) if name == "genext" else ""
            rows.append(Row("kvcache", case.name, str(dtype)[6:], "fwd", name, t * 1e3, bps / 1e9,
                            100 * bps / copy_bps, check))
        del q, k, v, kk, vv
    return rows, all_ok


def print_kvcache_table(rows: list[Row]) -> None:
    rows = [r for r in rows if r.op == "kvcache"]
    if not rows:
        return
    head = f"{'decode case':<32} {'dtype':<9} {'impl':<15} {'ms':>9} {'KV GB/s':>8} {'%copy':>6}  check"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.case:<32} {r.dtype:<9} {r.impl:<15} {r.ms:>9.3f} {r.gbps:>8.1f} {r.pct_copy:>6.1f}  {r.check}")
