"""A few small CUDA calls of every genext op, checked against the float64 reference.

Small on purpose: tools/gpu_check.sh runs it under compute-sanitizer (memcheck, racecheck), where
every kernel is many times slower. Exits non-zero on a wrong result.
"""
from __future__ import annotations

import sys

import torch

import genext
from genext import reference

CASES = [  # (shape, groups, channels_last, dtype): one per kernel path
    ((1, 64, 96, 96), 32, False, torch.float16),   # few groups: split-group path
    ((1, 64, 96, 96), 32, True, torch.bfloat16),   # split path, channels-last
    ((4, 64, 9, 7), 8, False, torch.float32),      # small odd groups
    ((16, 96, 8, 8), 32, False, torch.float16),    # many small groups: one block per group
    ((2, 40, 33), 5, True, torch.float32),         # rank 3, channels-last, C/G = 8
    ((1, 6, 5, 7, 3), 2, False, torch.float16),    # rank 5, odd sizes
]


def main() -> int:
    bad = 0
    for shape, g, cl, dtype in CASES:
        x = (torch.randn(shape, device="cuda", dtype=torch.float64) * 2 + 1).to(dtype)
        if cl:
            x = (x.to(memory_format=torch.channels_last) if x.dim() == 4
                 else x.transpose(1, 2).contiguous().transpose(1, 2))
        x.requires_grad_()
        w = (torch.rand(shape[1], device="cuda") + 0.5).to(dtype).requires_grad_()
        b = (torch.rand(shape[1], device="cuda") - 0.5).to(dtype).requires_grad_()
        gy = torch.randn_like(x)
        y = genext.ops.group_norm_silu(x, g, w, b)
        grads = torch.autograd.grad(y, (x, w, b), gy)
        xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
        yr = reference.group_norm_silu(xd, g, wd, bd)
        rgrads = torch.autograd.grad(yr, (xd, wd, bd), gy.double())
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for name, o, r in [("y", y, yr)] + list(zip(("dx", "dw", "db"), grads, rgrads)):
            err = ((o.double() - r).norm() / r.norm()).item()
            ok = bool(torch.isfinite(o).all()) and err < tol
            bad += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {str(shape):<20} g={g:<3} cl={cl!s:<5} {str(dtype):<15} "
                  f"{name:<3} rel err {err:.2e}")
    torch.cuda.synchronize()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
