"""KV-cache decode: genext.ops.attention_with_kvcache against PyTorch SDPA (``enable_gqa=True``,
every backend that takes the case) reading the same cache.

The figure of merit is the rate at which K and V are read: 2 * B * Hk * Lk * D * itemsize bytes
per call over the time, and that rate as a share of the device's copy bandwidth (read + write),
as ../shared/ANCHORS.md reports it. Lq = 1 and no append, so both sides do the same work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import reference
from ..ops import attention_with_kvcache
from .registry import (
    DTYPE,
    IMPL,
    MS,
    PCT_COPY,
    Bench,
    Case,
    Column,
    Config,
    Timing,
    device_cases,
    positive,
)


@dataclass(frozen=True)
class DecodeCase:
    B: int
    Hq: int
    Hk: int
    Lk: int
    D: int
    block_size: int | None = None  # paged when set

    @property
    def name(self) -> str:
        s = f"B{self.B}Hq{self.Hq}Hk{self.Hk}Lk{self.Lk}D{self.D}"
        return s + (f"-paged{self.block_size}" if self.block_size else "")

    def kv_bytes(self, itemsize: int) -> int:
        return 2 * self.B * self.Hk * self.Lk * self.D * itemsize


# Issue 4's cases (H100/H200, bf16) and small CPU cases.
CUDA_CASES = [
    DecodeCase(16, 32, 8, 8192, 128),
    DecodeCase(1, 32, 8, 32768, 128),
    DecodeCase(64, 32, 8, 2048, 128),
    DecodeCase(16, 32, 8, 8192, 128, block_size=16),
    DecodeCase(16, 32, 8, 8192, 128, block_size=256),
]
CPU_CASES = [
    DecodeCase(4, 8, 2, 2048, 64),
    DecodeCase(4, 8, 2, 2048, 64, block_size=16),
    DecodeCase(4, 8, 2, 2048, 64, block_size=256),
    DecodeCase(1, 8, 2, 512, 64),  # a small Llama's decode step, batch 1 and 8
    DecodeCase(8, 8, 2, 512, 64),
    DecodeCase(8, 4, 4, 128, 64),
    DecodeCase(1, 8, 2, 128, 64),
]


class DecodeInputs(NamedTuple):
    q: torch.Tensor  # (B, 1, Hq, D)
    k: torch.Tensor  # the cache: (B, Lk, Hk, D), or a paged pool (blocks, block_size, Hk, D)
    v: torch.Tensor
    seqlens: torch.Tensor
    table: torch.Tensor | None  # (B, blocks per sequence) when paged


def decode_inputs(case: DecodeCase, dtype, device) -> DecodeInputs:
    """q, caches holding Lk tokens per sequence (contiguous, or paged with the blocks of each
    sequence scattered over the pool), lengths, block table (or None)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(case.B, 1, case.Hq, case.D, generator=g).to(device, dtype)
    seqlens = torch.full((case.B,), case.Lk, dtype=torch.int32, device=device)
    if case.block_size is None:
        k = torch.randn(case.B, case.Lk, case.Hk, case.D, generator=g).to(device, dtype)
        v = torch.randn(case.B, case.Lk, case.Hk, case.D, generator=g).to(device, dtype)
        return DecodeInputs(q, k, v, seqlens, None)
    per_seq = -(-case.Lk // case.block_size)
    nblocks = case.B * per_seq
    k = torch.randn(nblocks, case.block_size, case.Hk, case.D, generator=g).to(device, dtype)
    v = torch.randn(nblocks, case.block_size, case.Hk, case.D, generator=g).to(device, dtype)
    table = torch.randperm(nblocks, generator=g).view(case.B, per_seq).to(device, torch.int32)
    return DecodeInputs(q, k, v, seqlens, table)


def gather_cache(k: torch.Tensor, table: torch.Tensor | None, lk: int) -> torch.Tensor:
    """The cache as (B, Hk, Lk, D) for SDPA (a view when contiguous, a gather when paged)."""
    if table is None:
        return k[:, :lk].transpose(1, 2)
    b = table.shape[0]
    blocks = k[table.long()]  # (B, per_seq, bs, Hk, D)
    return blocks.reshape(b, -1, k.shape[2], k.shape[3])[:, :lk].transpose(1, 2)


def _sdpa(backend=None) -> Callable:
    def fn(q, k, v):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    return fn


def sdpa_impls(device: str) -> dict[str, Callable]:
    """fn(q, k, v) on (B, H, L, D) of each SDPA backend that runs on the device."""
    if device != "cuda":
        return {"sdpa": _sdpa()}
    return {
        "sdpa-flash": _sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa-cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa-efficient": _sdpa(SDPBackend.EFFICIENT_ATTENTION),
        "sdpa-math": _sdpa(SDPBackend.MATH),
    }


def decode_check(case: DecodeCase, dtype, device) -> tuple[bool, str]:
    """genext on two sequences against the float64 reference on the same cache: no worse than twice
    the error of PyTorch's math path in the same dtype."""
    small = DecodeCase(
        min(case.B, 2), case.Hq, case.Hk, min(case.Lk, 4096), case.D, case.block_size
    )
    q, k, v, lens, table = decode_inputs(small, dtype, device)
    ours = attention_with_kvcache(q, k, v, lens, causal=True, block_table=table, check_values=False)
    if not torch.isfinite(ours).all():
        return False, "non-finite output"
    ref = reference.attention_with_kvcache(
        q.double(), k.double(), v.double(), lens, causal=True, block_table=table
    )
    kk, vv = gather_cache(k, table, small.Lk), gather_cache(v, table, small.Lk)
    pt = _sdpa(SDPBackend.MATH)(q.transpose(1, 2), kk, vv).transpose(1, 2)
    e_ours = (ours.double() - ref).abs().max().item()
    e_pt = (pt.double() - ref).abs().max().item()
    tol = 2 * e_pt + (1e-6 if dtype != torch.float32 else 1e-5)
    return e_ours <= tol, f"max {e_ours:.1e} (math {e_pt:.1e})"


def _genext(inputs: DecodeInputs) -> Callable[[int], object]:
    q, k, v, lens, table = inputs
    # no host-side value checks: they would add a device sync to every timed call
    return lambda i: attention_with_kvcache(
        q, k, v, lens, causal=True, block_table=table, check_values=False
    )


def _sdpa_setup(fn: Callable, lk: int) -> Callable:
    def setup(inputs: DecodeInputs) -> Callable[[int], object]:
        qq = inputs.q.transpose(1, 2)
        kk, vv = gather_cache(inputs.k, inputs.table, lk), gather_cache(inputs.v, inputs.table, lk)
        return lambda i: fn(qq, kk, vv)

    return setup


def make_case(case: DecodeCase, config: Config) -> Case:
    dtype = config.dtype_or(torch.bfloat16 if config.device == "cuda" else torch.float32)
    # CPU decode calls take 20 us to 1 ms: a median of 3 was one scheduler hiccup away from a
    # wrong ratio, and 25 calls of each cost at most a few tens of milliseconds
    warmup, reps = (5, 30) if config.device == "cuda" else (3, 25)
    setups = {"genext": _genext}
    setups.update(
        {name: _sdpa_setup(fn, case.Lk) for name, fn in sdpa_impls(config.device).items()}
    )
    timings = tuple(
        Timing(
            impl,
            "fwd",
            setup,
            warmup,
            reps,
            nbytes=case.kv_bytes(dtype.itemsize),
            shows_check=impl == "genext",
            on_error="n/a",  # a backend may not take a case
            context=torch.no_grad,
        )
        for impl, setup in setups.items()
    )
    return Case(
        case.name,
        dtype,
        timings,
        lambda _: decode_check(case, dtype, config.device),
        inputs=lambda: decode_inputs(case, dtype, config.device),
    )


def cases(config: Config) -> list[Case]:
    shapes = device_cases(config, CUDA_CASES, CPU_CASES, quick=lambda s: s[:1])
    return [make_case(c, config) for c in shapes]


BENCH = Bench(
    "kvcache",
    "KV-cache decode: genext vs PyTorch SDPA with enable_gqa (K/V read GB/s, % of copy)",
    cases,
    (
        Column("decode case", "case"),
        DTYPE,
        IMPL,
        MS,
        Column("KV GB/s", "gbps", ".1f", positive),
        PCT_COPY,
    ),
)
