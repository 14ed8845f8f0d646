"""The prepared tensor-core VQ lookup (csrc/vq/vq_tc.cu, chosen with GENEXT_VQ_TENSOR_CORES=1,
which the CUDA binding reads at each call) on a GPU: per case of the VQ bench and 16-bit dtype, the
time of the exact kernel, of the tensor-core path and of ``torch.cdist(z, E).argmin(1)`` (CUDA
events, median of 10 after 2 warm-ups, interleaved in one process), and how many of the
tensor-core path's indices and distances equal the exact kernel's over every row (100% expected:
it re-checks its candidates with the exact kernel's arithmetic). One JSON line per case.

    python tools/bench_vq_tensor_cores.py
"""

from __future__ import annotations

import json
import sys

import torch

from genext.bench import env_switch, time_fn
from genext.bench.vq import CUDA_CASES, vq_inputs
from genext.ops import vq_nearest


def measure(case, dtype) -> dict:
    z, cb = vq_inputs(case, dtype, "cuda")
    exact = vq_nearest(z, cb)
    with env_switch("GENEXT_VQ_TENSOR_CORES", True):
        tc = vq_nearest(z, cb)
    row = {"case": case.name, "dtype": str(dtype).split(".")[-1]}
    row["index_agreement_pct"] = round(100 * (tc[0] == exact[0]).float().mean().item(), 4)
    row["distance_bits_equal_pct"] = round(100 * (tc[1] == exact[1]).float().mean().item(), 4)
    calls = {
        "exact": (False, lambda i: vq_nearest(z, cb)),
        "tensor_cores": (True, lambda i: vq_nearest(z, cb)),
        "exact_again": (False, lambda i: vq_nearest(z, cb)),
        "cdist": (False, lambda i: torch.cdist(z, cb).argmin(1)),
    }
    for name, (on, fn) in calls.items():
        try:
            with env_switch("GENEXT_VQ_TENSOR_CORES", on):
                row[f"{name}_ms"] = round(time_fn(fn, "cuda", 2, 10) * 1e3, 3)
        except RuntimeError as e:  # cdist: out of memory for the N x K matrix
            row[f"{name}_ms"] = f"failed: {str(e).splitlines()[0][:60]}"
    return row


def main() -> int:
    bad = 0
    for case in CUDA_CASES:
        for dtype in (torch.bfloat16, torch.float16):
            row = measure(case, dtype)
            print(json.dumps(row), flush=True)
            bad += row["index_agreement_pct"] < 100
            torch.cuda.empty_cache()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
