"""`genext bench`: every selected bench's cases, each checked and then timed implementation by
implementation, printed as one table per bench and optionally written as JSON.

Exit status 0 when every check passed, 1 when one failed, 2 when the run could not start.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time
from dataclasses import asdict
from typing import Any

import torch

from .harness import busy_core, copy_bandwidth, host_time_fn, peak_extra_mib, time_fn
from .registry import Bench, Case, Config, Row, Timing, benches, select
from .table import print_table, speedups


def check_text(ok: bool | None, note: str) -> str:
    """A check's note as a row shows it: "ok ..." or "FAIL ...", the bare note when nothing was
    compared."""
    return note if ok is None else f"{'ok' if ok else 'FAIL'} {note}"


def figures(timing: Timing, seconds: float, copy_bps: float) -> tuple[float, float, dict]:
    """(GB/s, % of the copy bandwidth, extra figures) of one unit that took `seconds`."""
    gbps = timing.nbytes / seconds / 1e9 if timing.nbytes else 0.0
    pct = 100 * timing.nbytes / seconds / copy_bps if timing.nbytes else 0.0
    return gbps, pct, ({"tflops": timing.flops / seconds / 1e12} if timing.flops else {})


def measure(
    bench: Bench,
    case: Case,
    timing: Timing,
    inputs: Any,
    device: str,
    copy_bps: float,
    check: str = "",
) -> Row | None:
    """Time one implementation of a case: a Row, or None when it is not available here."""
    clock = host_time_fn if timing.clock == "host" else time_fn
    try:
        with timing.context():
            fn = timing.setup(inputs)
            if fn is None:
                return None
            seconds = clock(fn, device, timing.warmup, timing.reps) / timing.units
            mib = peak_extra_mib(lambda: fn(0), device) if timing.peak_memory else None
    except RuntimeError as e:
        if timing.on_error is None:
            raise
        first = (str(e).splitlines() or [type(e).__name__])[0]
        return Row(
            bench.name,
            case.name,
            str(case.dtype)[6:],
            timing.direction,
            timing.impl,
            math.nan,
            0.0,
            0.0,
            f"{timing.on_error}: {first[:60]}",
        )
    gbps, pct, extra = figures(timing, seconds, copy_bps)
    if mib is not None:
        extra["peak_extra_MiB"] = mib
    return Row(
        bench.name,
        case.name,
        str(case.dtype)[6:],
        timing.direction,
        timing.impl,
        seconds * 1e3,
        gbps,
        pct,
        check if timing.shows_check else "",
        extra,
    )


def run_bench(bench: Bench, config: Config, copy_bps: float) -> tuple[list[Row], bool]:
    """All of a bench's rows for a run, and whether every check passed."""
    rows, all_ok = [], True
    for case in bench.cases(config):
        inputs = case.inputs()
        ok, note = case.check(inputs)
        all_ok &= ok is not False
        for timing in case.timings:
            row = measure(
                bench, case, timing, inputs, config.device, copy_bps, check_text(ok, note)
            )
            if row is not None:
                rows.append(row)
        del inputs
    for i, (ratio, baseline) in speedups(rows).items():
        rows[i].extra.update(speedup_vs_best=ratio, best_baseline=baseline)
    return rows, all_ok


def list_benches() -> None:
    """`genext bench --list`: each registered bench's name and summary."""
    registered = benches()
    width = max(map(len, registered), default=0)
    for name, bench in registered.items():
        print(f"{name:<{width}}  {bench.summary}")


def run(
    ops: list[str] | None = None,
    device: str | None = None,
    dtype: str | None = None,
    quick: bool = False,
    compile_baselines: bool = True,
    json_path: str | None = None,
    busy: bool = False,
) -> int:
    """`genext bench`: the benches named in `ops` (all by default) on `device` (CUDA when there is
    a GPU), in `dtype` (each bench's default when None); with `busy`, while another process keeps
    one core busy. Returns the exit status."""
    selected = select(ops)  # an unknown name fails here, before any timing
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("genext bench: --device cuda but no GPU is visible")
        return 2
    config = Config(device, getattr(torch, dtype) if dtype else None, quick, compile_baselines)
    with busy_core() if busy else contextlib.nullcontext():
        return _run(selected, config, device, json_path, busy)


def _run(selected: list[Bench], config: Config, device: str, json_path: str | None, busy: bool):
    copy_bps = copy_bandwidth(device)
    env = {
        "device": (
            torch.cuda.get_device_name()
            if device == "cuda"
            else platform.processor() or platform.machine()
        ),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "copy_GBps": copy_bps / 1e9,
        "busy_core": busy,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    load = f", load average {env['load_average']:.1f}" if env["load_average"] is not None else ""
    print(
        f"genext bench on {env['device']} ({device}, {env['threads']} threads), torch {env['torch']}, "
        f"copy bandwidth {copy_bps / 1e9:.0f} GB/s (read + write){load}"
        + ("; one core kept busy by another process" if busy else ""),
        flush=True,
    )
    rows, ok = [], True
    for bench in selected:
        bench_rows, good = run_bench(bench, config, copy_bps)
        print_table(
            bench, bench_rows
        )  # as each bench ends: a later failure keeps the tables so far
        rows += bench_rows
        ok &= good
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"env": env, "rows": [asdict(r) for r in rows]}, f, indent=1)
    if not ok:
        print("genext bench: a correctness check FAILED")
    return 0 if ok else 1
