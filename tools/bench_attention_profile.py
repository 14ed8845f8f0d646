"""A quick look at genext's flash-attention kernels on a GPU: the issue-3 cases, forward and
forward+backward, bf16, TFLOP/s (one JSON line per row; --flash adds SDPA's flash backend), and
with --profile the CUDA time of each kernel in one forward+backward at B4 H16 L4096 D128.
Cheaper than `genext bench --op attention` (no cuDNN/efficient rows, no float64 checks), for
trying kernel changes on a short device lease. --atomic-dq adds forward+backward rows of the
prepared backward that sums dQ with atomics in the dK/dV kernel (GENEXT_FA_ATOMIC_DQ=1, which the
CUDA binding reads at each call), timed beside the default path in the same process, and with
--profile its kernel times too.

    python tools/bench_attention_profile.py [--flash] [--atomic-dq] [--profile]
"""

from __future__ import annotations

import json
import sys

import torch

from genext.bench import copies_for_l2, env_switch, time_fn
from genext.bench.attention import CUDA_CASES, attn_call, attn_impls, attn_inputs

ATOMIC = "genext-atomic-dq"


def main(argv: list[str]) -> int:
    impls = attn_impls("cuda")
    impls[ATOMIC] = impls["genext"]
    names = ["genext"] + ([ATOMIC] if "--atomic-dq" in argv else [])
    names += ["flash"] if "--flash" in argv else []
    dtype = torch.bfloat16
    for case in CUDA_CASES:
        size = 3 * case.B * case.H * case.Lq * case.D * 2
        n = copies_for_l2(size, "cuda")
        for name in names:
            for direction in ("fwd", "f+b") if name != ATOMIC else ("f+b",):
                sets = attn_inputs(case, dtype, "cuda", copies=n, grad=direction == "f+b")
                with env_switch("GENEXT_FA_ATOMIC_DQ", name == ATOMIC):
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
        for name in ["genext"] + ([ATOMIC] if "--atomic-dq" in argv else []):
            with env_switch("GENEXT_FA_ATOMIC_DQ", name == ATOMIC):
                for _ in range(2):
                    torch.autograd.grad(fn(q, k, v, False), (q, k, v), g)
                torch.cuda.synchronize()
                with torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CUDA]
                ) as prof:
                    torch.autograd.grad(fn(q, k, v, False), (q, k, v), g)
                    torch.cuda.synchronize()
            print(f"{name}, one forward+backward of {case.name}:", flush=True)
            for key in ("device_time_total", "cuda_time_total"):
                try:
                    print(prof.key_averages().table(sort_by=key, row_limit=8), flush=True)
                    break
                except (KeyError, AttributeError, ValueError):
                    continue
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
