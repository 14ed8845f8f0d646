"""`genext bench`: genext against eager PyTorch and torch.compile, with a correctness check per case.

The case lists here are shared with benchmarks/bench_*.py (pytest-benchmark). Timing: on CUDA,
CUDA events around each call after warm-up, inputs rotated so that repeats do not run from L2;
on the CPU, wall time. The median of the repeats is reported.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from . import reference
from .ops import group_norm_silu


# ---- timing ---------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[int], object], device: str, warmup: int, reps: int) -> float:
    """Median seconds of fn(i) over `reps` calls; i rotates over the caller's input copies."""
    for i in range(warmup):
        fn(i)
    _sync(device)
    times = []
    if device == "cuda":
        for i in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for i in range(reps):
            t0 = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Device copy rate in bytes/s, counting bytes read plus bytes written."""
    if device == "cpu":
        nbytes = 1 << 27
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda i: dst.copy_(src), device, warmup=3, reps=10)
    return 2 * nbytes / t


def peak_extra_mib(fn: Callable[[], object], device: str) -> float:
    """Peak memory fn allocates beyond what was live before it, in MiB (CUDA; NaN elsewhere)."""
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copies_for_l2(tensor_bytes: int, device: str) -> int:
    """How many input copies to rotate so that consecutive calls do not hit in L2."""
    if device != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(1, min(8, -(-3 * l2 // max(tensor_bytes, 1))))


# ---- cases ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GNCase:
    shape: tuple[int, ...]
    groups: int = 32
    channels_last: bool = False

    @property
    def name(self) -> str:
        return "x".join(map(str, self.shape)) + ("-cl" if self.channels_last else "")


# The shapes the foundation issue sets targets for (H100/H200 fp16), and the CPU target shape.
GN_CUDA_CASES = [
    GNCase((1, 512, 128, 128)),
    GNCase((1, 256, 256, 256)),
    GNCase((1, 128, 512, 512)),
    GNCase((2, 320, 64, 64)),
    GNCase((2, 1280, 16, 16)),
    GNCase((2, 320, 64, 64), channels_last=True),
]
GN_CPU_CASES = [
    GNCase((1, 128, 256, 256)),
    GNCase((1, 128, 256, 256), channels_last=True),
    GNCase((2, 320, 64, 64)),
    GNCase((2, 1280, 16, 16)),
]


def gn_inputs(case: GNCase, dtype: torch.dtype, device: str, copies: int = 1, grad: bool = False):
    """`copies` independent (x, weight, bias, grad_y) sets; never zeros."""
    c = case.shape[1]
    sets = []
    for _ in range(copies):
        x = torch.randn(case.shape, device=device, dtype=dtype) * 2 + 1
        if case.channels_last:
            x = x.to(memory_format=torch.channels_last)
        w = (torch.rand(c, device=device) + 0.5).to(dtype)
        b = (torch.rand(c, device=device) - 0.5).to(dtype)
        if grad:
            x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
        gy = torch.randn_like(x) if grad else None
        sets.append((x, w, b, gy))
    return sets


def gn_impls(compile_too: bool) -> dict[str, Callable]:
    impls = {"genext": group_norm_silu, "eager": reference.group_norm_silu_eager}
    if compile_too:
        # backward is timed over a retained graph, which donated buffers forbid
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
        impls["compile"] = torch.compile(reference.group_norm_silu_eager)
    return impls


def gn_check(case: GNCase, dtype: torch.dtype, device: str) -> tuple[bool, str]:
    """genext vs the float64 reference: float32 within 1e-5 (relative norm), 16-bit no worse than
    twice eager PyTorch's own error."""
    shape = (min(case.shape[0], 1),) + case.shape[1:]
    x, w, b, _ = gn_inputs(GNCase(shape, case.groups, case.channels_last), dtype, device)[0]
    ref = reference.group_norm_silu(x.double(), case.groups, w.double(), b.double())
    y = group_norm_silu(x, case.groups, w, b).double()
    if not torch.isfinite(y).all():
        return False, "non-finite output"
    if dtype == torch.float32:
        err = ((y - ref).norm() / ref.norm()).item()
        return err < 1e-5, f"rel {err:.1e}"
    ours = (y - ref).abs().max().item()
    pt = (reference.group_norm_silu_eager(x, case.groups, w, b).double() - ref).abs().max().item()
    return ours <= 2 * pt + 1e-6, f"max {ours:.1e} (eager {pt:.1e})"


@dataclass
class Row:
    op: str
    case: str
    dtype: str
    direction: str  # fwd, bwd (alone, over a retained graph), f+b
    impl: str
    ms: float
    gbps: float
    pct_copy: float
    check: str = ""
    extra: dict = field(default_factory=dict)


def bench_group_norm_silu(device: str, dtype: torch.dtype, quick: bool, compile_too: bool,
                          copy_bps: float) -> tuple[list[Row], bool]:
    cases = GN_CUDA_CASES if device == "cuda" else GN_CPU_CASES
    if quick:
        cases = cases[:1] + cases[-1:]
    warmup, reps = (5, 20) if device == "cuda" else (2, 7)
    if quick:
        warmup, reps = 1, 3
    rows, all_ok = [], True
    for case in cases:
        ok, note = gn_check(case, dtype, device)
        all_ok &= ok
        numel = 1
        for s in case.shape:
            numel *= s
        size = numel * torch.tensor([], dtype=dtype).element_size()
        n = copies_for_l2(size, device)
        for name, fn in gn_impls(compile_too).items():
            sets = gn_inputs(case, dtype, device, copies=n)
            t = time_fn(lambda i: fn(sets[i % n][0], case.groups, sets[i % n][1], sets[i % n][2]),
                        device, warmup, reps)
            bps = 2 * size / t  # read x + write y
            rows.append(Row("group_norm_silu", case.name, str(dtype)[6:], "fwd", name, t * 1e3,
                            bps / 1e9, 100 * bps / copy_bps, ("ok " if ok else "FAIL ") + note))
            # backward alone: autograd over a retained graph (read x, read grad_y, write grad_x)
            gsets = gn_inputs(case, dtype, device, copies=n, grad=True)
            outs = [fn(x, case.groups, w, b) for x, w, b, _ in gsets]

            def bwd(i, outs=outs, gsets=gsets):
                x, w, b, gy = gsets[i % n]
                torch.autograd.grad(outs[i % n], (x, w, b), gy, retain_graph=True)

            t = time_fn(bwd, device, warmup, reps)
            bps = 3 * size / t
            rows.append(Row("group_norm_silu", case.name, str(dtype)[6:], "bwd", name, t * 1e3,
                            bps / 1e9, 100 * bps / copy_bps))

            # forward + backward, as a training step runs them (5 tensor passes at the floor)
            def fwd_bwd(i, gsets=gsets):
                x, w, b, gy = gsets[i % n]
                torch.autograd.grad(fn(x, case.groups, w, b), (x, w, b), gy)

            t = time_fn(fwd_bwd, device, warmup, reps)
            bps = 5 * size / t
            rows.append(Row("group_norm_silu", case.name, str(dtype)[6:], "f+b", name, t * 1e3,
                            bps / 1e9, 100 * bps / copy_bps))
            del outs, gsets, sets
    return rows, all_ok


def _benches() -> dict[str, Callable]:
    from .bench_attention import bench_attention  # these import this module: register lazily
    from .bench_kvcache import bench_kvcache
    from .bench_samplers import bench_samplers
    from .bench_contrastive import bench_contrastive
    from .bench_vq import bench_vq

    return {"group_norm_silu": bench_group_norm_silu, "attention": bench_attention,
            "kvcache": bench_kvcache, "sampler": bench_samplers, "vq": bench_vq,
            "contrastive": bench_contrastive}


def print_table(rows: list[Row]) -> None:
    head = f"{'op':<16} {'case':<20} {'dtype':<9} {'dir':<4} {'impl':<8} {'ms':>9} {'GB/s':>8} {'%copy':>6}  check"
    print(head)
    print("-" * len(head))
    for r in rows:
        if r.op in ("attention", "kvcache", "sampler", "vq", "contrastive"):
            continue
        print(f"{r.op:<16} {r.case:<20} {r.dtype:<9} {r.direction:<4} {r.impl:<8} {r.ms:>9.3f} "
              f"{r.gbps:>8.1f} {r.pct_copy:>6.1f}  {r.check}")


def run(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("genext bench: --device cuda but no GPU is visible")
        return 2
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device == "cuda" else torch.float32)
    copy_bps = copy_bandwidth(device)
    env = {
        "device": torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "copy_GBps": copy_bps / 1e9,
    }
    print(f"genext bench on {env['device']} ({device}, {env['threads']} threads), torch {env['torch']}, "
          f"copy bandwidth {copy_bps / 1e9:.0f} GB/s (read + write)")
    rows, ok = [], True
    for op, bench in _benches().items():
        if args.op and args.op != op:
            continue
        r, good = bench(device, dtype, args.quick, not args.no_compile, copy_bps)
        rows += r
        ok &= good
    if any(r.op not in ("attention", "kvcache", "sampler", "vq", "contrastive") for r in rows):
        print_table(rows)
    from .bench_attention import print_attention_table
    from .bench_kvcache import print_kvcache_table
    from .bench_samplers import print_sampler_table
    from .bench_contrastive import print_contrastive_table
    from .bench_vq import print_vq_table

    print_attention_table(rows)
    print_kvcache_table(rows)
    print_sampler_table(rows)
    print_vq_table(rows)
    print_contrastive_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": [asdict(r) for r in rows]}, f, indent=1)
    if not ok:
        print("genext bench: a correctness check FAILED")
    return 0 if ok else 1
