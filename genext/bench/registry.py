"""What a bench module declares, and the registry that finds it.

A bench module is one file in genext/bench/ with a module-level ``BENCH = Bench(...)``: its name
(for ``genext bench --op``), a one-line summary, a function from a :class:`Config` to its cases,
and the columns of its table. The registry imports every module of the package and collects their
``BENCH``, so adding a bench is adding its file.

A :class:`Case` is one shape (or configuration) in one dtype: a correctness check, the inputs its
timings share, and its timings. A :class:`Timing` is one row of results: one implementation in
one direction, timed by the harness. Building cases allocates nothing: inputs are built when a
case runs, so both ``genext bench`` and the pytest-benchmark wrappers can list every (case,
implementation, direction) first and time any one of them alone.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import pkgutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

# check(inputs) -> (ok, note): ok None when nothing was compared (the note says why)
Check = Callable[[Any], "tuple[bool | None, str]"]


@dataclass(frozen=True)
class Config:
    """What a run asks for: the device, a dtype (None: each bench's own default), the short case
    lists and repeats of a smoke run, whether to add torch.compile baselines, and whether the run
    is under load (--busy: CPU rows report mean calls, see runner.BUSY_MIN_SECONDS)."""

    device: str
    dtype: torch.dtype | None = None
    quick: bool = False
    compile: bool = True
    busy: bool = False

    def dtype_or(self, default: torch.dtype) -> torch.dtype:
        return self.dtype if self.dtype is not None else default

    @property
    def compile_models(self) -> bool:
        """Whether to add torch.compile baselines of whole models (U-Net, VAE, a sampling
        pipeline): not on a quick CPU run, where compiling one takes minutes on a few cores."""
        return self.compile and not (self.quick and self.device == "cpu")


def device_cases(
    config: Config,
    cuda: list,
    cpu: list,
    quick: Callable[[list], list] = lambda cases: cases[:1] + cases[-1:],
) -> list:
    """The device's list of cases; on a quick run a short part of it (its first and last unless
    `quick` picks otherwise)."""
    cases = cuda if config.device == "cuda" else cpu
    return quick(cases) if config.quick else cases


@dataclass(frozen=True)
class Timing:
    """One implementation in one direction of a case.

    ``setup(inputs)`` gets the case's shared inputs, builds whatever else the call needs (input
    copies to rotate, graphs to run backward over) and returns ``fn(i)``, the call to time (i
    counts the calls), or None when this implementation is not available here (the row is left
    out). ``nbytes`` and ``flops`` are what one unit must move and compute: the figures of merit
    (GB/s and %copy, TFLOP/s) come from them; ``units`` is how many units one call runs (a 50-step
    sampling loop), so times and figures are per unit.
    """

    impl: str
    direction: str
    setup: Callable[[Any], Callable[[int], object] | None]
    warmup: int
    reps: int
    nbytes: float = 0.0
    flops: float = 0.0
    units: int = 1
    clock: str = "device"  # "device": harness.time_fn; "host": harness.host_time_fn
    peak_memory: bool = False  # also report the call's peak extra memory (CUDA)
    shows_check: bool = False  # this row carries the case's check note
    on_error: str | None = None  # a RuntimeError becomes a row "<on_error>: <message>"
    # entered around the setup and the calls (on the CPU, where a case's implementations take
    # turns, around each call outside its timed span): configuration an implementation needs,
    # held for this timing's calls only and restored after each
    context: Callable[[], AbstractContextManager] = contextlib.nullcontext


@dataclass(frozen=True)
class Case:
    """One case of a bench: its name and dtype (two columns of every row), its timings, a check
    of genext's result on it, and the inputs shared by the check and the timings (built once per
    case, when it runs)."""

    name: str
    dtype: torch.dtype
    timings: tuple[Timing, ...]
    check: Check
    inputs: Callable[[], Any] = lambda: None


@dataclass
class Row:
    """One result of `genext bench` (a JSON row)."""

    op: str
    case: str
    dtype: str
    direction: str  # e.g. fwd, bwd (alone, over a retained graph), f+b, step
    impl: str
    ms: float
    gbps: float
    pct_copy: float
    check: str = ""
    extra: dict = field(default_factory=dict)
    # the case's correctness check: True or False, None when nothing was compared (`check` says
    # why); the same for every row of a case
    ok: bool | None = None
    # the spread of the timed calls, per unit like ms: the fastest and slowest call, the
    # interquartile range in % of the median, and whether that range makes the row noisy
    # (harness.NOISY_IQR_PCT); NaN / False for rows that were not timed
    min_ms: float = math.nan
    max_ms: float = math.nan
    iqr_pct: float = math.nan
    noisy: bool = False


def finite(value: float) -> bool:
    """A number that means something: not NaN, not infinite."""
    return math.isfinite(value)


def positive(value: float) -> bool:
    """A figure that is 0 only when it was not computed (GB/s without a byte count, TFLOP/s
    without a flop count)."""
    return math.isfinite(value) and value > 0


@dataclass(frozen=True)
class Column:
    """A column of a bench's table: a header and the value of a row (a Row attribute's name or a
    function of the row). Numbers are right-aligned with the format spec ``fmt``, text left.

    ``meaningful(value)`` says whether a number means something in a row (by default: finite);
    a cell that does not is shown as "-", and a column with no such cell in a table is left out
    of it (TFLOP/s where nothing counts flops, peak MiB on the CPU)."""

    header: str
    value: str | Callable[[Row], object]
    fmt: str = ""
    meaningful: Callable[[float], bool] = finite

    def get(self, row: Row) -> object:
        value = getattr(row, self.value) if isinstance(self.value, str) else self.value(row)
        return math.nan if value is None and self.fmt else value

    def shows(self, row: Row) -> bool:
        """Whether this column's cell of `row` means something (text always does)."""
        if not self.fmt:
            return True
        value = self.get(row)
        return isinstance(value, (int, float)) and self.meaningful(float(value))


def extra(key: str) -> Callable[[Row], float]:
    """A column value read from a row's extra figures (NaN where the row has none)."""
    return lambda row: row.extra.get(key, float("nan"))


# columns most tables share
DTYPE = Column("dtype", "dtype")
DIRECTION = Column("dir", "direction")
IMPL = Column("impl", "impl")
MS = Column("ms", "ms", ".3f")
GBPS = Column("GB/s", "gbps", ".1f", positive)
# above 100 a row beat the measured copy rate (data in a cache on the CPU, or a kernel that only
# reads): shown as it is, with a note under the table
PCT_COPY = Column("%copy", "pct_copy", ".1f", positive)
TFLOPS = Column("TFLOP/s", extra("tflops"), ".1f", positive)
PEAK_MIB = Column("peak MiB", extra("peak_extra_MiB"), ".1f")


@dataclass(frozen=True)
class Bench:
    """A registered bench: ``cases(config)`` lists its cases for a run; ``columns`` lay out its
    table (the check column comes last in every table)."""

    name: str
    summary: str
    cases: Callable[[Config], list[Case]]
    columns: tuple[Column, ...]


def benches() -> dict[str, Bench]:
    """Every bench of the package by name: the ``BENCH`` of each module of genext.bench."""
    package = importlib.import_module(__package__)
    found: dict[str, Bench] = {}
    for info in pkgutil.iter_modules(package.__path__):
        bench = getattr(importlib.import_module(f"{__package__}.{info.name}"), "BENCH", None)
        if bench is None:
            continue
        if bench.name in found:
            raise ValueError(f"genext bench: two modules register the bench {bench.name!r}")
        found[bench.name] = bench
    return dict(sorted(found.items()))


def select(names: list[str] | None) -> list[Bench]:
    """The benches named (all when names is empty or None); an unknown name is a ValueError that
    lists the registered ones."""
    registered = benches()
    unknown = [n for n in names or [] if n not in registered]
    if unknown:
        raise ValueError(
            f"unknown bench {', '.join(map(repr, unknown))}; registered: {', '.join(registered)}"
        )
    return [registered[n] for n in dict.fromkeys(names)] if names else list(registered.values())
