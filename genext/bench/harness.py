"""The timing harness every bench shares: timed calls after warm-ups (CUDA events, or the host
clock around a device sync; on the CPU several implementations' calls taken in turn, so that they
share the machine's load, a fixed count of them or until a time budget is spent) and their spread
(with the rule that flags a row noisy), the device's copy bandwidth (the floor that GB/s is
compared with), peak extra memory, how many input copies to rotate so that repeats do not run
from L2, and a process that keeps one core busy (timing under load).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

# The host clock the CPU timings read, in seconds (a module attribute: tests drive a fake one)
clock: Callable[[], float] = time.perf_counter


@contextlib.contextmanager
def env_switch(name: str, on: bool) -> Iterator[None]:
    """Environment variable `name` set to "1" inside when `on` and unset when not, as before
    after: for the switches genext's C++ bindings read at each call (the prepared CUDA paths the
    GPU checks time beside the default ones in one process)."""
    before = os.environ.get(name)
    if on:
        os.environ[name] = "1"
    else:
        os.environ.pop(name, None)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def sync(device: str) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def time_samples(fn: Callable[[int], object], device: str, warmup: int, reps: int) -> list[float]:
    """Seconds of each of `reps` calls fn(i) after `warmup` calls; i counts the calls, so fn can
    rotate over its input copies. CUDA events around each call on CUDA (the device time, not the
    host's launch time), the host clock on the CPU."""
    for i in range(warmup):
        fn(i)
    sync(device)
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
            t0 = clock()
            fn(i)
            times.append(clock() - t0)
    return times


def time_fn(fn: Callable[[int], object], device: str, warmup: int, reps: int) -> float:
    """Median seconds of fn(i) over `reps` calls after `warmup` calls (see :func:`time_samples`)."""
    return statistics.median(time_samples(fn, device, warmup, reps))


def host_time_samples(
    fn: Callable[[int], object], device: str, warmup: int, reps: int
) -> list[float]:
    """Seconds of each of `reps` calls fn(i) after `warmup` calls on the host clock, each call
    followed by a device sync: for loops whose host side (a scheduler's Python, launches) is part
    of what is measured."""
    for i in range(warmup):
        fn(i)
    sync(device)
    times = []
    for i in range(reps):
        t0 = clock()
        fn(i)
        sync(device)
        times.append(clock() - t0)
    return times


@dataclass(frozen=True)
class Contender:
    """One of the calls :func:`interleaved_samples` times in turn: fn(i) (i counts its warm-up
    calls, then its timed calls, from 0 each, as in :func:`time_samples`), how many of each it
    gets, the context entered around each of its calls (outside the timed span), and whether a
    RuntimeError from one of its calls retires it (the error is returned in place of its
    samples) instead of ending the whole timing."""

    fn: Callable[[int], object]
    warmup: int
    reps: int
    context: Callable[[], AbstractContextManager] = contextlib.nullcontext
    catch: bool = False


def rounds(counts: Sequence[int]) -> Iterator[tuple[int, int]]:
    """(contender, its call index) in the order interleaved calls run: round r calls once each
    contender that still wants a call (r below its count), starting from contender r mod n, so
    that none always runs first or always runs right after the same other one."""
    n = len(counts)
    for r in range(max(counts, default=0)):
        for j in range(n):
            k = (r + j) % n
            if r < counts[k]:
                yield k, r


# The most timed calls a contender makes when interleaved_samples extends its rounds to a time
# budget (calls of a few microseconds would otherwise run for tens of thousands of rounds).
MAX_EXTENDED_REPS = 2000


def sem_from_sums(n: int, total: float, squares: float) -> float:
    """The standard error of the mean over the mean, from n values' sum and sum of squares (inf
    below two values or for a mean that is not positive)."""
    if n < 2 or total <= 0:
        return math.inf
    var = max(0.0, (squares - total * total / n) / (n - 1))
    return math.sqrt(var / n) / (total / n)


def relative_sem(times: Sequence[float]) -> float:
    """The standard error of the mean of `times` over their mean (inf below two calls)."""
    return sem_from_sums(len(times), math.fsum(times), math.fsum(t * t for t in times))


def interleaved_samples(
    contenders: Sequence[Contender],
    min_seconds: float = 0.0,
    rel_sem: float = 0.0,
    max_seconds: float = 0.0,
) -> list[list[float] | RuntimeError]:
    """Seconds of each timed call of each contender on the host clock (the CPU), the
    contenders' calls taken in turn (:func:`rounds`): warm-up rounds, then timed rounds. Load
    from other work that changes over seconds then falls on every contender alike, where timing
    one after the other would give each a different share of it. Per contender: its `reps`
    times, or the RuntimeError that retired it (only where it `catch`es; otherwise the error
    propagates). Each call runs inside a fresh entry of its own context: contexts of different
    contenders need not compose (thread counts, grad modes, backend selections).

    With `min_seconds`, further rounds (every contender still timed takes part, so the
    interleaving holds) follow until each contender's timed calls add up to that many seconds
    or it has made MAX_EXTENDED_REPS calls: enough calls for a mean that counts the rare long
    ones (a scheduler slice spent waiting for a descheduled thread) at their real rate. The
    rounds also stop once all the timed calls together took twice `min_seconds` per contender,
    so that a fast contender's budget does not keep a much slower one running for long.

    With `rel_sem` as well, a contender whose mean is still less precise than that (standard error
    over mean, :func:`relative_sem`) after `min_seconds` wants further rounds until it is, or until
    its calls add up to `max_seconds`; the rounds then stop at twice `max_seconds` per contender
    in all. Under load a few calls wait tens of milliseconds, and a mean over half a second of
    calls still moved by a quarter from run to run.

    A call may start while the previous contender's threads still spin (PyTorch's OpenMP workers
    do for milliseconds after a parallel region): on a 2-core machine genext's pool, called
    straight after SDPA, measured up to 1.5x slower than after its own call. A pause before each
    call removed that but made a loaded machine's rows noisier (the sleep hands the core to other
    processes), so there is none."""
    results: list[list[float] | RuntimeError] = [[] for _ in contenders]

    totals = [0.0] * len(contenders)  # each contender's timed seconds so far
    squares = [0.0] * len(contenders)  # and the sum of their squares (the mean's precision)

    def call(k: int, i: int, timed: bool) -> None:
        c, times = contenders[k], results[k]
        if isinstance(times, RuntimeError):  # retired by an earlier call
            return
        try:
            with c.context():
                t0 = clock()
                c.fn(i)
                t1 = clock()
        except RuntimeError as e:
            if not c.catch:
                raise
            results[k] = e
            return
        if timed:
            times.append(t1 - t0)
            totals[k] += t1 - t0
            squares[k] += (t1 - t0) ** 2

    for k, i in rounds([c.warmup for c in contenders]):
        call(k, i, timed=False)
    for k, i in rounds([c.reps for c in contenders]):
        call(k, i, timed=True)

    def wants_more(k: int) -> bool:
        times = results[k]
        if isinstance(times, RuntimeError) or len(times) >= MAX_EXTENDED_REPS:
            return False
        if totals[k] < min_seconds:
            return True
        precision = sem_from_sums(len(times), totals[k], squares[k])  # no pass over the calls
        return rel_sem > 0 and totals[k] < max_seconds and precision > rel_sem

    def spent() -> float:
        return sum(t for t, r in zip(totals, results) if not isinstance(r, RuntimeError))

    n, r = len(contenders), max((c.reps for c in contenders), default=0)
    budget = 2 * n * (max(min_seconds, max_seconds) if rel_sem > 0 else min_seconds)
    while min_seconds > 0 and any(wants_more(k) for k in range(n)) and spent() < budget:
        for j in range(n):
            k = (r + j) % n
            times = results[k]
            if not isinstance(times, RuntimeError) and len(times) < MAX_EXTENDED_REPS:
                call(k, len(times), timed=True)
        r += 1
    return results


def upper_median(times: list[float]) -> float:
    """The upper median: a time one of the calls really took (never an average of two)."""
    return sorted(times)[len(times) // 2]


def host_time_fn(fn: Callable[[int], object], device: str, warmup: int, reps: int) -> float:
    """The upper median of :func:`host_time_samples`."""
    return upper_median(host_time_samples(fn, device, warmup, reps))


# A timed row is "noisy" when the interquartile range of its calls exceeds this share of their
# median: on a quiet machine repeated calls of one op agree within a few percent, so a wider
# spread says that something else (another process, frequency changes) took part in the figure.
NOISY_IQR_PCT = 15.0


@dataclass(frozen=True)
class Spread:
    """How the timed calls of one row spread: the fastest and slowest call and the interquartile
    range as a percentage of the median (NaN with fewer than two calls)."""

    min: float
    max: float
    iqr_pct: float

    @property
    def noisy(self) -> bool:
        return is_noisy(self.iqr_pct)


def is_noisy(iqr_pct: float | None) -> bool:
    """The noisy-row rule: IQR above NOISY_IQR_PCT percent of the median."""
    return iqr_pct is not None and math.isfinite(iqr_pct) and iqr_pct > NOISY_IQR_PCT


def spread(times: list[float], median: float | None = None) -> Spread:
    """The :class:`Spread` of a row's call times (quartiles interpolated between the calls, as
    ``statistics.quantiles(..., method="inclusive")``); `median` is the figure the row reports
    (the median unless given)."""
    if not times:
        return Spread(math.nan, math.nan, math.nan)
    mid = statistics.median(times) if median is None else median
    if len(times) < 2 or mid <= 0:
        return Spread(min(times), max(times), math.nan)
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return Spread(min(times), max(times), 100 * (q3 - q1) / mid)


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
    """How many input copies to rotate so that consecutive calls do not hit in L2 (at least three
    L2s' worth of inputs, at most 8 copies; 1 on the CPU)."""
    if device != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(1, min(8, -(-3 * l2 // max(tensor_bytes, 1))))


@contextlib.contextmanager
def busy_core() -> Iterator[subprocess.Popen]:
    """Keeps one core busy with another process (a Python loop that never sleeps) while the block
    runs: how ops behave beside data-loader workers or other jobs, where an intra-op thread team
    must wait for whichever of its threads the OS has descheduled."""
    spin = subprocess.Popen(
        [sys.executable, "-c", "while True: pass"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.2)  # until it spins
        yield spin
    finally:
        spin.kill()
        spin.wait()
