"""The prepared fused row/column log-sum-exp of the contrastive losses (csrc/contrastive/lse_rows.cu,
chosen with GENEXT_CONTRASTIVE_FUSED=1, which the CUDA binding reads at each call) on a GPU, bf16:
per size, tiled_lse (rows and columns) and clip_loss forward and forward+backward with the
composite path and with the fused forward, one N x N x D bf16 matrix product for scale, the
fused lse's largest difference from the composite's, and the peak memory above the inputs
(CUDA events, median of 10 after 2 warm-ups, in one process). One JSON line per size.

    python tools/bench_contrastive_fused.py
"""

from __future__ import annotations

import json
import sys

import torch

from genext.bench import env_switch, time_fn
from genext.ops import clip_loss

SIZES = [(8192, 512), (32768, 768)]


def peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)


def measure(n: int, d: int) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    img = img.to("cuda", torch.bfloat16).requires_grad_()
    txt = txt.to("cuda", torch.bfloat16).requires_grad_()
    scale = torch.tensor(14.3, device="cuda", requires_grad=True)
    lse = torch.ops.genext.tiled_lse.default
    row = {"N": n, "D": d}
    with torch.no_grad():
        ref = lse(img, txt, scale, None, True)
        with env_switch("GENEXT_CONTRASTIVE_FUSED", True):
            got = lse(img, txt, scale, None, True)
    row["lse_max_abs_diff"] = max((a - b).abs().max().item() for a, b in zip(got, ref))

    def fwd():
        with torch.no_grad():
            lse(img, txt, scale, None, True)

    def loss_fwd():
        with torch.no_grad():
            clip_loss(img, txt, scale)

    def loss_fb():
        torch.autograd.grad(clip_loss(img, txt, scale), (img, txt, scale))

    for name, fn in (("tiled_lse", fwd), ("clip_fwd", loss_fwd), ("clip_f+b", loss_fb)):
        for path, on in (("composite", False), ("fused", True)):
            with env_switch("GENEXT_CONTRASTIVE_FUSED", on):
                row[f"{name}_{path}_ms"] = round(
                    time_fn(lambda i, fn=fn: fn(), "cuda", 2, 10) * 1e3, 3
                )
                row[f"{name}_{path}_peak_mib"] = peak_mib(fn)
    try:
        with torch.no_grad():
            row["one_gemm_ms"] = round(time_fn(lambda i: img @ txt.T, "cuda", 2, 10) * 1e3, 3)
    except RuntimeError as e:  # the N x N product may not fit
        row["one_gemm_ms"] = f"failed: {str(e).splitlines()[0][:60]}"
    return row


def main() -> int:
    bad = 0
    for n, d in SIZES:
        row = measure(n, d)
        print(json.dumps(row), flush=True)
        bad += not row["lse_max_abs_diff"] <= 1e-3
        torch.cuda.empty_cache()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
