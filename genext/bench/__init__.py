"""`genext bench` and the cases the pytest-benchmark wrappers (benchmarks/) time: genext against
eager PyTorch, torch.compile and peer libraries, with a correctness check per case.

- :mod:`.harness`: timing (CUDA events or the host clock, warm-ups, medians; on the CPU several
  implementations' calls in turn), copy bandwidth,
  peak memory, input rotation against L2;
- :mod:`.registry`: what a bench module declares (Bench, Case, Timing, Column) and the registry
  that finds every module's ``BENCH``;
- :mod:`.table`: the tables, laid out by each bench's columns;
- :mod:`.runner`: the run of `genext bench`;
- one module per op (or model) with its cases: adding one is adding its file.

Library code never imports this package.
"""

from .harness import (
    NOISY_IQR_PCT,
    Contender,
    Spread,
    busy_core,
    copies_for_l2,
    copy_bandwidth,
    env_switch,
    host_time_fn,
    host_time_samples,
    interleaved_samples,
    is_noisy,
    peak_extra_mib,
    spread,
    sync,
    time_fn,
    time_samples,
)
from .registry import Bench, Case, Column, Config, Row, Timing, benches, select
from .runner import (
    check_text,
    figures,
    list_benches,
    measure,
    measure_case,
    measure_interleaved,
    run,
    run_bench,
    strict,
    write_json,
)
from .table import format_table, plot_speedups, print_saved, print_table, row_from_json, speedups

__all__ = [
    "NOISY_IQR_PCT",
    "Bench",
    "Case",
    "Column",
    "Config",
    "Contender",
    "Row",
    "Spread",
    "Timing",
    "busy_core",
    "benches",
    "check_text",
    "copies_for_l2",
    "copy_bandwidth",
    "env_switch",
    "figures",
    "format_table",
    "host_time_fn",
    "host_time_samples",
    "interleaved_samples",
    "is_noisy",
    "list_benches",
    "measure",
    "measure_case",
    "measure_interleaved",
    "peak_extra_mib",
    "plot_speedups",
    "print_saved",
    "print_table",
    "row_from_json",
    "run",
    "run_bench",
    "select",
    "speedups",
    "spread",
    "strict",
    "sync",
    "time_fn",
    "time_samples",
    "write_json",
]
