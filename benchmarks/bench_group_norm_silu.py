"""pytest-benchmark: genext.ops.group_norm_silu vs eager PyTorch vs torch.compile.

    pytest benchmarks/bench_group_norm_silu.py --benchmark-columns=median,ops

Cases come from genext.bench (the shapes the targets are set for); GB/s is stored in each
result's extra_info (fwd: read x + write y; bwd: read x and grad_y, write grad_x; fwd+bwd: both).
"""
from __future__ import annotations

import pytest
import torch

from genext.bench import (GN_CPU_CASES, GN_CUDA_CASES, copies_for_l2, gn_check, gn_impls,
                          gn_inputs)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
CASES = GN_CUDA_CASES if DEVICE == "cuda" else GN_CPU_CASES
IMPLS = gn_impls(compile_too=True)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("direction", ["fwd", "bwd", "fwd+bwd"])
def test_group_norm_silu(benchmark, case, impl, direction):
    ok, note = gn_check(case, DTYPE, DEVICE)
    assert ok, note
    fn = IMPLS[impl]
    size = torch.Size(case.shape).numel() * torch.tensor([], dtype=DTYPE).element_size()
    n = copies_for_l2(size, DEVICE)
    sets = gn_inputs(case, DTYPE, DEVICE, copies=n, grad=direction != "fwd")
    counter = iter(range(1 << 62))
    if direction == "fwd":
        def call():
            x, w, b, _ = sets[next(counter) % n]
            fn(x, case.groups, w, b)
            _sync()
        nbytes = 2 * size
    elif direction == "fwd+bwd":
        def call():
            x, w, b, gy = sets[next(counter) % n]
            torch.autograd.grad(fn(x, case.groups, w, b), (x, w, b), gy)
            _sync()
        nbytes = 5 * size
    else:
        outs = [fn(x, case.groups, w, b) for x, w, b, _ in sets]

        def call():
            i = next(counter) % n
            x, w, b, gy = sets[i]
            torch.autograd.grad(outs[i], (x, w, b), gy, retain_graph=True)
            _sync()
        nbytes = 3 * size
    benchmark.extra_info.update(device=DEVICE, dtype=str(DTYPE), bytes=nbytes)
    benchmark.pedantic(call, warmup_rounds=3, rounds=20 if DEVICE == "cuda" else 7, iterations=1)
    benchmark.extra_info["GBps_median"] = nbytes / benchmark.stats.stats.median / 1e9
