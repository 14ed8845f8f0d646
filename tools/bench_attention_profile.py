"""A quick look at genext's flash-attention kernels on a GPU: the issue-3 cases, forward and
forward+backward, bf16, TFLOP/s (one JSON line per row; --flash adds SDPA's flash backend), and
with --profile the CUDA time of each kernel in one forward+backward at B4 H16 L4096 D128.
Cheaper than `genext bench --op attention` (no cuDNN/efficient rows, no float64 checks), for
trying kernel changes on a short device lease.

    python tools/bench_attention_profile.py [--flash] [--profile]
"""

from __future__ import annotations

import json
import sys

import torch

from genext.bench import copies_for_l2, time_fn
from genext.bench.attention import CUDA_CASES, attn_call, attn_impls, attn_inputs


def main(argv: list[str]) -> int:
    impls = attn_impls("cuda")
    names = ["genext"] + (["flash"] if "--flash" in argv else [])
    dtype = torch.bfloat16
    for case in CUDA_CASES:
        size = 3 * case.B * case.H * case.Lq * case.D * 2
        n = copies_for_l2(size, "cuda")
        for name in names:
            for direction in ("fwd", "f+b"):
                sets = attn_inputs(case, dtype, "cuda", copies=n, grad=direction == "f+b")
                t = time_fn(attn_call(case, impls[name], sets, direction), "cuda", 3, 10)
                print(
                    json.dumps(
                        {
                            "impl": name,
                            "case": case.name,
                            "dir": direction,
                            "ms": round(t * 1e3, 4),
                            "tflops": round(case.flops(direction) / t / 1e12, 1),
                        }
                    ),
                    flush=True,
                )
                del sets
    if "--profile" in argv:
        case = CUDA_CASES[0]
        q, k, v, g = attn_inputs(case, dtype, "cuda", grad=True)[0]
        fn = impls["genext"]
        for _ in range(2):
            torch.autograd.grad(fn(q, k, v, False), (q, k, v), g)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            torch.autograd.grad(fn(q, k, v, False), (q, k, v), g)
            torch.cuda.synchronize()
        for key in ("device_time_total", "cuda_time_total"):
            try:
                print(prof.key_averages().table(sort_by=key, row_limit=8), flush=True)
                break
            except (KeyError, AttributeError, ValueError):
                continue
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
