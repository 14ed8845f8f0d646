"""pytest-benchmark: genext.ops.flash_attention vs PyTorch's SDPA backends (flash, cuDNN,
memory-efficient on CUDA; PyTorch's default on the CPU).

    pytest benchmarks/bench_flash_attention.py --benchmark-columns=median,ops

Cases come from genext.bench_attention (the shapes issue 3 sets targets for); TFLOP/s is stored in
each result's extra_info (4*B*H*Lq*Lk*D forward, halved when causal, x3.5 for forward+backward).
"""
from __future__ import annotations

import pytest
import torch

from genext.bench import copies_for_l2
from genext.bench_attention import ATTN_CPU_CASES, ATTN_CUDA_CASES, attn_check, attn_impls, attn_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
CASES = ATTN_CUDA_CASES if DEVICE == "cuda" else ATTN_CPU_CASES[:1]
IMPLS = attn_impls(DEVICE)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("direction", ["fwd", "f+b"])
def test_attention(benchmark, case, impl, direction):
    ok, note = attn_check(case, DTYPE, DEVICE)
    assert ok, note
    fn = IMPLS[impl]
    size = 3 * case.B * case.H * case.Lq * case.D * torch.tensor([], dtype=DTYPE).element_size()
    n = copies_for_l2(size, DEVICE)
    sets = attn_inputs(case, DTYPE, DEVICE, copies=n, grad=direction == "f+b")
    counter = iter(range(1 << 62))

    def call():
        q, k, v, g = sets[next(counter) % n]
        if direction == "fwd":
            with torch.no_grad():
                fn(q, k, v, case.causal)
        else:
            torch.autograd.grad(fn(q, k, v, case.causal), (q, k, v), g)
        _sync()

    try:
        call()
    except RuntimeError as e:  # e.g. a backend that does not take this shape or GPU
        pytest.skip(f"{impl}: {str(e).splitlines()[0]}")
    benchmark.extra_info.update(device=DEVICE, dtype=str(DTYPE), flops=case.flops(direction))
    benchmark.pedantic(call, warmup_rounds=2, rounds=10 if DEVICE == "cuda" else 3, iterations=1)
    benchmark.extra_info["TFLOPs_median"] = case.flops(direction) / benchmark.stats.stats.median / 1e12
