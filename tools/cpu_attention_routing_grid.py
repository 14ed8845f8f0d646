"""genext's CPU flash-attention kernel against PyTorch's SDPA over a grid of head dims, shapes,
causality and directions: the measurements behind the CPU routing rule
(genext.ops.flash_attention.cpu_forward_prefers_torch). The rule is switched off for the run, so
genext's rows are its own kernel at every shape. Calls of the two alternate (the harness's
interleaved timing); one line per (head dim, shape, causal, direction) with the median of each
and PyTorch's time over genext's (above 1: genext faster).

    python tools/cpu_attention_routing_grid.py [--dtype bfloat16] [--dims 2,8,16]
        [--shapes 4x2x256,2x8x64] [--causal both|yes|no] [--threads N]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys

import torch
import torch.nn.functional as F

import genext.ops  # noqa: F401  (registers the ops; the module below is genext.ops.flash_attention)
from genext.bench.harness import Contender, interleaved_samples

routing = sys.modules["genext.ops.flash_attention"]  # the package attribute is the function


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--dims", default="2,8,16,24,32,64", help="head dims, comma-separated")
    p.add_argument("--shapes", default="4x2x256,2x8x64,1x4x1024", help="BxHxL, comma-separated")
    p.add_argument("--causal", default="both", choices=("both", "yes", "no"))
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    p.add_argument("--seconds", type=float, default=0.3, help="timed seconds per implementation")
    return p.parse_args(argv)


def row(dtype, d: int, b: int, h: int, length: int, causal: bool, grad: bool, seconds: float):
    """(genext's median, SDPA's median) in microseconds for one point of the grid."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(b, h, length, d, generator=g).to(dtype).requires_grad_(grad) for _ in range(3)
    )
    go = torch.randn(b, h, length, d, generator=g).to(dtype)

    def timed(attn):
        if grad:
            return lambda i: attn(q, k, v, causal).backward(go)
        return lambda i: attn(q, k, v, causal)

    ours = timed(lambda q, k, v, c: genext.ops.flash_attention(q, k, v, causal=c))
    torch_ = timed(lambda q, k, v, c: F.scaled_dot_product_attention(q, k, v, is_causal=c))
    times = interleaved_samples(
        [Contender(ours, 3, 20), Contender(torch_, 3, 20)], min_seconds=seconds
    )
    return tuple(statistics.median(t) * 1e6 for t in times)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    dims = [int(x) for x in args.dims.split(",")]
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    # genext's own kernel throughout: flash_attention asks the rule's C++ form (0: genext's kernel)
    routing._route = lambda *args: 0
    print(f"{args.dtype}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for d, (b, h, length), causal, grad in itertools.product(dims, shapes, causals, (False, True)):
        ours, theirs = row(dtype, d, b, h, length, causal, grad, args.seconds)
        print(
            f"D{d} B{b}H{h}L{length} {'causal' if causal else 'full  '} "
            f"{'f+b' if grad else 'fwd'} genext {ours:9.0f} us  sdpa {theirs:9.0f} us  "
            f"{theirs / ours:5.2f}x",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
