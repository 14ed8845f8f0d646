"""`genext bench`: every selected bench's cases, each checked and then timed (on the CPU the
implementations of a case and direction call by call in turn, on CUDA one after another), printed
as one table per bench and optionally written as strict JSON and plotted.

Progress goes to stderr (a line per case as it finishes, or a tqdm bar on a terminal), so the
tables on stdout and the JSON file stay clean. The run warns when the machine is busy (load
average above the core count at its start or end, or many noisy rows): its figures are then
slower and wider than a quiet machine's.

Exit status 0 when every check passed, 1 when one failed, 2 when the run could not start.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .harness import (
    NOISY_IQR_PCT,
    Contender,
    busy_core,
    copy_bandwidth,
    host_time_samples,
    interleaved_samples,
    peak_extra_mib,
    relative_sem,
    spread,
    time_samples,
    upper_median,
)
from .registry import Bench, Case, Config, Row, Timing, benches, select
from .table import print_table, speedups

DTYPES = ("float32", "float16", "bfloat16")  # what --dtype takes
DEVICES = ("cpu", "cuda")  # what --device takes
# a run is busy when at least this share of its timed rows is noisy
NOISY_SHARE = 0.25
# Under --busy a CPU row is the mean of its calls, over at least this many seconds of them (or
# harness.MAX_EXTENDED_REPS calls): with a core taken by another process, a thread team now and
# then waits a whole scheduler slice (milliseconds) for a thread the OS has descheduled. Those
# waits are what load costs, and a median of a few calls leaves them out (eager PyTorch's small
# GroupNorm, 2 threads beside a busy core: median 0.20 ms, mean 0.63 ms, 11% of calls over 1 ms).
BUSY_MIN_SECONDS = 0.5
# ... and then, while its mean is less precise than BUSY_REL_SEM (standard error over mean), for
# up to BUSY_MAX_SECONDS of calls: beside a busy core the CLIP loss at N1024 took 5-16 ms in its
# fastest calls and 80-185 ms in its slowest, for genext and eager alike, and half a second of
# them gave ratios from 0.6x to 1.8x in runs minutes apart.
BUSY_REL_SEM = 0.03
BUSY_MAX_SECONDS = 3.0

# progress(case, its rows, seconds it took)
Progress = Callable[[Case, "list[Row]", float], None]


def check_text(ok: bool | None, note: str) -> str:
    """A check's note as a row shows it: "ok ..." or "FAIL ...", the bare note when nothing was
    compared."""
    return note if ok is None else f"{'ok' if ok else 'FAIL'} {note}"


def figures(timing: Timing, seconds: float, copy_bps: float) -> tuple[float, float, dict]:
    """(GB/s, % of the copy bandwidth, extra figures) of one unit that took `seconds`."""
    gbps = timing.nbytes / seconds / 1e9 if timing.nbytes else 0.0
    pct = 100 * timing.nbytes / seconds / copy_bps if timing.nbytes else 0.0
    return gbps, pct, ({"tflops": timing.flops / seconds / 1e12} if timing.flops else {})


def _row(bench: Bench, case: Case, timing: Timing, ms: float, *figures_etc, **kw) -> Row:
    """A Row of this bench, case and implementation (the fields after ms as Row takes them)."""
    return Row(
        bench.name,
        case.name,
        str(case.dtype)[6:],
        timing.direction,
        timing.impl,
        ms,
        *figures_etc,
        **kw,
    )


def _error_row(
    bench: Bench, case: Case, timing: Timing, error: RuntimeError, ok: bool | None
) -> Row:
    """The row of an implementation that raised: no figures, its `on_error` label and the
    message's first line."""
    first = (str(error).splitlines() or [type(error).__name__])[0]
    return _row(bench, case, timing, math.nan, 0.0, 0.0, f"{timing.on_error}: {first[:60]}", ok=ok)


def _timed_row(
    bench: Bench,
    case: Case,
    timing: Timing,
    samples: list[float],
    mib: float | None,
    copy_bps: float,
    check: str,
    ok: bool | None,
    mean: bool = False,
) -> Row:
    """The row of an implementation whose calls took `samples` seconds each: their median (the
    upper median on the host clock's loops: a time one loop really took), or with `mean` their
    mean (under load, where the rare calls that wait a scheduler slice are part of the cost)."""
    times = [t / timing.units for t in samples]
    median = upper_median(times) if timing.clock == "host" else statistics.median(times)
    seconds = statistics.fmean(times) if mean and times else median
    gbps, pct, extra = figures(timing, seconds, copy_bps)
    if mean:
        extra.update(median_ms=median * 1e3, calls=len(times))
        rel = relative_sem(times)
        if math.isfinite(rel):  # the mean's own precision: its standard error over it
            extra["sem_pct"] = 100 * rel
    if mib is not None:
        extra["peak_extra_MiB"] = mib
    sp = spread(times, median)
    return _row(
        bench,
        case,
        timing,
        seconds * 1e3,
        gbps,
        pct,
        check if timing.shows_check else "",
        extra,
        ok=ok,
        min_ms=sp.min * 1e3,
        max_ms=sp.max * 1e3,
        iqr_pct=sp.iqr_pct,
        noisy=sp.noisy,
    )


def measure(
    bench: Bench,
    case: Case,
    timing: Timing,
    inputs: Any,
    device: str,
    copy_bps: float,
    check: str = "",
    ok: bool | None = None,
) -> Row | None:
    """Time one implementation of a case alone: a Row, or None when it is not available here.
    `check` and `ok` are the case's check (its note as rows show it, and its verdict)."""
    samples = host_time_samples if timing.clock == "host" else time_samples
    try:
        with timing.context():
            fn = timing.setup(inputs)
            if fn is None:
                return None
            times = samples(fn, device, timing.warmup, timing.reps)
            mib = peak_extra_mib(lambda: fn(0), device) if timing.peak_memory else None
    except RuntimeError as e:
        if timing.on_error is None:
            raise
        return _error_row(bench, case, timing, e, ok)
    return _timed_row(bench, case, timing, times, mib, copy_bps, check, ok)


def measure_interleaved(
    bench: Bench,
    case: Case,
    timings: list[Timing],
    inputs: Any,
    copy_bps: float,
    check: str = "",
    ok: bool | None = None,
    busy: bool = False,
) -> list[Row | None]:
    """Time several implementations of a case on the CPU together, call by call in turn
    (harness.interleaved_samples): each timing set up inside its own context, then warm-up and
    timed rounds that call each once. Per timing, in order: its Row, or None when it is not
    available here. An implementation that raises (in its setup or any call) gets its error row
    where it has `on_error`, and the others go on; otherwise the error propagates. With `busy`
    (a run under load) the rounds go on for BUSY_MIN_SECONDS of each one's calls, then while a
    mean is less precise than BUSY_REL_SEM for up to BUSY_MAX_SECONDS, and rows report the mean
    call (see BUSY_MIN_SECONDS)."""
    rows: list[Row | None] = [None] * len(timings)
    ready: list[tuple[int, Callable[[int], object]]] = []
    for k, timing in enumerate(timings):
        try:
            with timing.context():
                fn = timing.setup(inputs)
        except RuntimeError as e:
            if timing.on_error is None:
                raise
            rows[k] = _error_row(bench, case, timing, e, ok)
            continue
        if fn is not None:
            ready.append((k, fn))
    results = interleaved_samples(
        [
            Contender(
                fn,
                timings[k].warmup,
                timings[k].reps,
                timings[k].context,
                catch=timings[k].on_error is not None,
            )
            for k, fn in ready
        ],
        min_seconds=BUSY_MIN_SECONDS if busy else 0.0,
        rel_sem=BUSY_REL_SEM if busy else 0.0,
        max_seconds=BUSY_MAX_SECONDS if busy else 0.0,
    )
    for (k, fn), samples in zip(ready, results):
        timing = timings[k]
        if isinstance(samples, RuntimeError):  # a call raised: only timings with on_error catch
            rows[k] = _error_row(bench, case, timing, samples, ok)
            continue
        try:
            with timing.context():
                mib = peak_extra_mib(lambda fn=fn: fn(0), "cpu") if timing.peak_memory else None
        except RuntimeError as e:
            if timing.on_error is None:
                raise
            rows[k] = _error_row(bench, case, timing, e, ok)
            continue
        rows[k] = _timed_row(bench, case, timing, samples, mib, copy_bps, check, ok, mean=busy)
    return rows


def measure_case(
    bench: Bench,
    case: Case,
    inputs: Any,
    device: str,
    copy_bps: float,
    check: str = "",
    ok: bool | None = None,
    busy: bool = False,
) -> list[Row]:
    """The rows of a case's timings, in the case's order, those not available here left out.
    On the CPU the implementations of each direction are timed together, call by call in turn
    (:func:`measure_interleaved`): load from other work, which changes over seconds on a shared
    machine, then falls on all of them alike instead of on whichever ran when it came. On CUDA
    each is timed alone with events (device time, which other processes' load barely moves)."""
    if device != "cpu":
        found = [measure(bench, case, t, inputs, device, copy_bps, check, ok) for t in case.timings]
        return [row for row in found if row is not None]
    groups: dict[str, list[int]] = {}
    for k, timing in enumerate(case.timings):
        groups.setdefault(timing.direction, []).append(k)
    rows: list[Row | None] = [None] * len(case.timings)
    for ks in groups.values():
        timings = [case.timings[k] for k in ks]
        for k, row in zip(
            ks, measure_interleaved(bench, case, timings, inputs, copy_bps, check, ok, busy)
        ):
            rows[k] = row
    return [row for row in rows if row is not None]


def run_bench(
    bench: Bench, config: Config, copy_bps: float, progress: Progress | None = None
) -> tuple[list[Row], bool]:
    """All of a bench's rows for a run, and whether every check passed; `progress` is called as
    each case finishes."""
    rows, all_ok = [], True
    for case in bench.cases(config):
        t0 = time.perf_counter()
        inputs = case.inputs()
        ok, note = case.check(inputs)
        all_ok &= ok is not False
        case_rows = measure_case(
            bench, case, inputs, config.device, copy_bps, check_text(ok, note), ok, config.busy
        )
        del inputs
        rows += case_rows
        if progress is not None:
            progress(case, case_rows, time.perf_counter() - t0)
    for i, (ratio, baseline) in speedups(rows).items():
        rows[i].extra.update(speedup_vs_best=ratio, best_baseline=baseline)
    return rows, all_ok


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def list_benches(device: str | None = None) -> None:
    """`genext bench --list`: each registered bench's name and summary, then its cases on
    `device` (the default device when None), those of a --quick run marked "quick"."""
    device = device or default_device()
    registered = benches()
    width = max(map(len, registered), default=0)
    for name, bench in registered.items():
        print(f"{name:<{width}}  {bench.summary}")
        full = [(c.name, str(c.dtype)[6:]) for c in bench.cases(Config(device, compile=False))]
        quick = [
            (c.name, str(c.dtype)[6:])
            for c in bench.cases(Config(device, quick=True, compile=False))
        ]
        for name_dtype in dict.fromkeys(full + quick):  # a quick run may add its own case
            mark = "  quick" if name_dtype in quick else ""
            print(f"{'':<{width}}    {'  '.join(name_dtype)}{mark}")
    print(f"(cases on {device}; `--quick` runs those marked quick)")


def cpu_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The one-minute load average (None where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def cpu_model() -> str:
    """The CPU's model name: /proc/cpuinfo on Linux, else what platform knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """The commit genext was built from (build_info's, when the build recorded one), else that
    of the source checkout this genext runs from (an editable install), else None."""
    import genext

    commit = genext.build_info().get("commit")
    if commit:
        return commit
    root = Path(genext.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            [
                "git",
                "-C",
                str(root),
                "describe",
                "--always",
                "--dirty",
                "--abbrev=12",
                "--exclude",
                "*",
            ],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def environment(device: str, copy_bps: float, busy_core_flag: bool) -> dict[str, Any]:
    """The `env` block of the JSON record: what the figures were measured with and on."""
    import genext

    info = genext.build_info()
    return {
        "genext": info["version"],
        "commit": git_commit(),
        "build": {
            "cuda": info["cuda"],
            "cuda_archs": info["cuda_archs"],
            "cuda_compiler": info["cuda_compiler"],
            "torch_built": info["torch_built"],
            "cpu_isa": info.get("cpu_isa"),
        },
        "torch": torch.__version__,
        "device_kind": device,
        "device": torch.cuda.get_device_name() if device == "cuda" else cpu_model(),
        "cpu": cpu_model(),
        "cores": cpu_cores(),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "copy_GBps": copy_bps / 1e9,
        "busy_core": busy_core_flag,
        "row_statistic": "mean" if busy_core_flag and device == "cpu" else "median",
        "load_average": load_average(),
        "noisy_iqr_pct": NOISY_IQR_PCT,
    }


def strict(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None, for strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def write_json(path: str, env: dict, rows: list[Row]) -> None:
    """The run as strict JSON (no NaN or Infinity literals: null)."""
    record = strict({"env": env, "rows": [asdict(r) for r in rows]})
    with open(path, "w") as f:
        json.dump(record, f, indent=1, allow_nan=False)
        f.write("\n")


def warn(text: str) -> None:
    print(f"genext bench: WARNING: {text}", flush=True)


def _busy_text(load: float | None, cores: int, when: str, own: int = 0) -> str | None:
    """A warning when the load average, less `own` (this run's threads), is above the cores."""
    if load is None or load - own <= cores:
        return None
    return (
        f"the machine is busy {when} (load average {load:.1f} on {cores} cores): other work "
        "shares the cores, so times are longer and wider than on a quiet machine"
    )


class _Reporter:
    """Progress on stderr: a tqdm bar on a terminal (when tqdm is installed), else one line per
    case as it finishes; the run's wall time at the end (from `t0`, before the copy bandwidth is
    measured)."""

    def __init__(self, total: int, t0: float):
        self.total, self.done, self.t0 = total, 0, t0
        self.bar = None
        if sys.stderr.isatty():
            with contextlib.suppress(ImportError):
                from tqdm import tqdm

                self.bar = tqdm(
                    total=total, unit="case", file=sys.stderr, leave=False, mininterval=0
                )

    def __call__(self, bench: Bench, case: Case, rows: list[Row], seconds: float) -> None:
        self.done += 1
        verdict = {True: "ok", False: "FAIL", None: "not compared"}[
            next((r.ok for r in rows), None)
        ]
        noisy = sum(r.noisy for r in rows)
        text = (
            f"{bench.name} {case.name} {str(case.dtype)[6:]}: {verdict}, {len(rows)} rows"
            + (f" ({noisy} noisy)" if noisy else "")
            + f" in {seconds:.1f} s"
        )
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update()
        else:
            print(f"[{self.done}/{self.total}] {text}", file=sys.stderr, flush=True)

    def close(self) -> float:
        if self.bar is not None:
            self.bar.close()
        wall = time.perf_counter() - self.t0
        print(
            f"genext bench: {self.done} case{'s' * (self.done != 1)} in {wall:.1f} s wall time",
            file=sys.stderr,
            flush=True,
        )
        return wall


def check_args(device: str | None, dtype: str | None) -> str | None:
    """What is wrong with --device / --dtype (None when nothing is), in words naming the option."""
    if device is not None and device not in DEVICES:
        return f"--device {device!r}: choose from {', '.join(DEVICES)}"
    if device == "cuda" and not torch.cuda.is_available():
        return (
            "--device cuda: no CUDA GPU is visible to torch "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False); use --device cpu"
        )
    if dtype is not None and dtype not in DTYPES:
        return f"--dtype {dtype!r}: choose from {', '.join(DTYPES)}"
    return None


def run(
    ops: list[str] | None = None,
    device: str | None = None,
    dtype: str | None = None,
    quick: bool = False,
    compile_baselines: bool = True,
    json_path: str | None = None,
    busy: bool = False,
    plot_path: str | None = None,
) -> int:
    """`genext bench`: the benches named in `ops` (all by default) on `device` (CUDA when there is
    a GPU), in `dtype` (each bench's default when None); with `busy`, while another process keeps
    one core busy; the rows written to `json_path` and plotted to `plot_path` when given.
    Returns the exit status."""
    selected = select(ops)  # an unknown name fails here, before any timing
    problem = check_args(device, dtype)
    if problem:
        print(f"genext bench: {problem}", file=sys.stderr)
        return 2
    device = device or default_device()
    config = Config(
        device, getattr(torch, dtype) if dtype else None, quick, compile_baselines, busy=busy
    )
    with busy_core() if busy else contextlib.nullcontext():
        return _run(selected, config, json_path, busy, plot_path)


def _run(
    selected: list[Bench], config: Config, json_path: str | None, busy: bool, plot_path: str | None
) -> int:
    t0 = time.perf_counter()
    device = config.device
    cores, load_start = cpu_cores(), load_average()
    copy_bps = copy_bandwidth(device)
    env = environment(device, copy_bps, busy)
    load = f", load average {load_start:.1f}" if load_start is not None else ""
    print(
        f"genext bench {env['genext']} on {env['device']} ({device}, {env['threads']} threads), "
        f"torch {env['torch']}, copy bandwidth {copy_bps / 1e9:.0f} GB/s (read + write){load}"
        + ("; one core kept busy by another process" if busy else ""),
        flush=True,
    )
    if busy and device == "cpu":
        print(
            f"genext bench: under load each row's ms is the mean of its calls over at least "
            f"{BUSY_MIN_SECONDS:g} s of them (the calls that wait a scheduler slice included), "
            "not the median",
            flush=True,
        )
    busy_start = _busy_text(load_start, cores, "at the start")
    if busy_start:
        warn(busy_start)
    total = sum(len(b.cases(config)) for b in selected)
    reporter = _Reporter(total, t0)
    rows, ok = [], True
    try:
        for bench in selected:
            bench_rows, good = run_bench(
                bench, config, copy_bps, lambda c, r, s, b=bench: reporter(b, c, r, s)
            )
            print_table(bench, bench_rows)  # as each bench ends: a later failure keeps these
            rows += bench_rows
            ok &= good
    finally:
        wall = reporter.close()
    load_end = load_average()
    timed = [r for r in rows if math.isfinite(r.iqr_pct)]
    noisy = sum(r.noisy for r in timed)
    # the load average at the end counts the bench's own running threads (and the --busy
    # spinner): only load beyond those is other work
    own = min(int(env["threads"]), cores) + (1 if busy else 0)
    busy_end = _busy_text(load_end, cores, "at the end", own)
    many_noisy = noisy >= max(2, NOISY_SHARE * len(timed))
    env.update(
        load_average_end=load_end,
        wall_s=wall,
        noisy_rows=noisy,
        timed_rows=len(timed),
        machine_busy=bool(busy_start or busy_end or many_noisy),
    )
    print()
    if noisy:
        print(
            f"genext bench: {noisy} of {len(timed)} timed rows are noisy (their calls' IQR is above "
            f"{NOISY_IQR_PCT:.0f}% of the median): read their figures as rough",
            flush=True,
        )
    if busy_end:
        warn(busy_end)
    if many_noisy:
        warn("many rows are noisy: rerun on a quiet machine before trusting close comparisons")
    skipped = _not_compared(rows)
    for line in skipped:
        print(f"genext bench: {line}", flush=True)
    if json_path:
        write_json(json_path, env, rows)
    if plot_path:
        from .table import plot_speedups

        try:
            plot_speedups(
                rows,
                plot_path,
                f"genext {env['genext']} on {env['device']} ({device}, {env['threads']} threads), "
                f"torch {env['torch']}, {env['date']}"
                + ("; a busy machine" if env["machine_busy"] else ""),
            )
            print(f"genext bench: speed-up plot written to {plot_path}", flush=True)
        except (ValueError, OSError) as e:  # nothing to plot, or an unwritable path: the
            # tables and JSON stand
            print(f"genext bench: no plot written: {e}", file=sys.stderr, flush=True)
    if not ok:
        print("genext bench: a correctness check FAILED")
    return 0 if ok else 1


def _not_compared(rows: list[Row]) -> list[str]:
    """A line per (bench, reason) whose cases ran without a correctness comparison."""
    cases: dict[tuple[str, str], set[str]] = {}
    for r in rows:
        if r.ok is None and r.check and math.isfinite(r.ms):  # not a row of a failed call
            cases.setdefault((r.op, r.check), set()).add(r.case)
    return [
        f"{op}: not compared on {len(names)} case{'s' * (len(names) > 1)}: {note}"
        for (op, note), names in sorted(cases.items())
    ]
