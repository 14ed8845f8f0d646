"""The tables of `genext bench`: laid out by the columns each bench declares."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict

import pytest

from genext.bench import (
    NOISY_IQR_PCT,
    Bench,
    Column,
    Row,
    busy_core,
    format_table,
    is_noisy,
    print_saved,
    speedups,
    spread,
    strict,
)
from genext.bench.registry import GBPS, IMPL, MS, PCT_COPY, PEAK_MIB, TFLOPS

BENCH = Bench(
    "attention",
    "",
    lambda config: [],
    (Column("attention case", "case"), IMPL, MS, TFLOPS, Column("us", lambda r: r.ms * 1e3, ".0f")),
)


def _rows() -> list[Row]:
    return [
        Row(
            "attention",
            "B1H4L512D64",
            "float32",
            "fwd",
            "genext",
            1.5,
            0.0,
            0.0,
            "ok max 1e-7",
            {"tflops": 12.25},
        ),
        Row("vq", "N16", "float32", "fwd", "genext", 2.0, 0.0, 0.0),
        Row(
            "attention",
            "B1",
            "float32",
            "fwd",
            "flash-attention",
            float("nan"),
            0.0,
            0.0,
            "n/a: no",
        ),
    ]


def test_columns_fit_their_widest_cell_numbers_right_text_left():
    lines = format_table(BENCH, _rows())
    assert lines == [
        "attention case impl               ms TFLOP/s   us  check",
        "--------------------------------------------------------",
        "B1H4L512D64    genext          1.500    12.2 1500  ok max 1e-7",
        "B1             flash-attention     -       -    -  n/a: no",  # nothing timed: "-"
    ]


def test_no_rows_no_table():
    assert format_table(BENCH, _rows()[1:2]) == []


def test_saved_json_prints_the_same_table(tmp_path, capsys, monkeypatch):
    path = tmp_path / "bench.json"
    # as `genext bench --json` writes it: strict, NaN as null
    path.write_text(
        json.dumps(strict({"env": {}, "rows": [asdict(r) for r in _rows()]}), allow_nan=False)
    )
    monkeypatch.setattr("genext.bench.table.benches", lambda: {"attention": BENCH})
    print_saved(str(path))
    assert capsys.readouterr().out.strip().splitlines() == format_table(BENCH, _rows())


def _row(case, impl, ms, direction="fwd", op="attention"):
    return Row(op, case, "float32", direction, impl, ms, 0.0, 0.0)


def test_speed_against_the_fastest_baseline_of_the_same_case_and_direction():
    rows = [
        _row("a", "genext", 2.0),
        _row("a", "sdpa", 3.0),
        _row("a", "eager", 2.5),
        _row("a", "diffusers+patch", 0.5),  # genext's kernels inside a peer: not a baseline
        _row("a", "transformers+genext-attn", 0.5),
        _row("a", "genext", 4.0, direction="f+b"),  # no baseline in its direction
        _row("b", "genext paged", 1.0),
        _row("b", "sdpa", 0.8),
        _row("b", "compile", float("nan")),  # a failed baseline is no baseline
        _row("b", "kernel", 0.4),
    ]
    fast = speedups(rows)
    assert fast == {0: (1.25, "eager"), 6: (0.8, "sdpa"), 9: (2.0, "sdpa")}
    lines = format_table(BENCH, rows)
    assert lines[0].split()[-3:] == ["vs", "best", "check"]
    assert lines[2].rstrip().endswith("1.25x eager") and lines[8].rstrip().endswith("0.80x sdpa")
    assert "x" not in lines[3].split()[-1]  # a baseline's own row has no speed


def _cpu_ticks(pid: int) -> int:
    """User plus system CPU ticks of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc")
def test_busy_core_spins_a_process_while_the_block_runs():
    with busy_core() as spin:
        assert spin.poll() is None
        before = _cpu_ticks(spin.pid)
        time.sleep(0.5)
        assert _cpu_ticks(spin.pid) > before  # it runs, it does not sleep
    assert spin.poll() is not None  # gone after the block


def test_spread_rule_on_synthetic_timings():
    # quartiles interpolated between the calls: for 1..5 ms, Q1 = 2 and Q3 = 4 around a median 3
    s = spread([0.005, 0.001, 0.004, 0.002, 0.003])
    assert (s.min, s.max) == (0.001, 0.005)
    assert s.iqr_pct == pytest.approx(100 * 2 / 3) and s.noisy
    tight = spread([1.00, 1.01, 0.99, 1.02, 1.00, 0.98, 1.01])
    assert tight.iqr_pct < 3 and not tight.noisy
    # one slow call among many does not make a row noisy (the IQR ignores the tails); a wide
    # middle does
    assert not spread([1.0] * 6 + [5.0]).noisy
    assert spread([1.0, 1.0, 1.2, 1.4, 1.4]).noisy
    # the rule's edge, and the figure a row reports as its centre (an upper median)
    assert not is_noisy(NOISY_IQR_PCT) and is_noisy(NOISY_IQR_PCT + 0.1)
    assert spread([1.0, 2.0], median=2.0).iqr_pct == pytest.approx(25.0)
    # one call has no spread; nothing timed has no figures
    assert math.isnan(spread([1.0]).iqr_pct) and not spread([1.0]).noisy
    assert math.isnan(spread([]).min) and not is_noisy(None) and not is_noisy(math.nan)


def test_spread_column_flags_noisy_rows():
    rows = [
        Row("attention", "a", "float32", "fwd", "genext", 1.0, 0, 0, iqr_pct=3.25),
        Row("attention", "a", "float32", "fwd", "sdpa", 2.0, 0, 0, iqr_pct=40.0, noisy=True),
    ]
    bench = Bench("attention", "", lambda c: [], (IMPL, MS))
    lines = format_table(bench, rows)
    assert lines[0].split() == ["impl", "ms", "iqr%", "vs", "best", "check"]
    assert lines[2].split()[2] == "3.2" and "noisy" not in lines[2]
    assert lines[3].split()[2:4] == ["40.0", "noisy"]
    # timed once: no spread to measure, and the table says so; not timed: nothing
    once = Row("attention", "b", "float32", "fwd", "eager", 2.0, 0, 0, min_ms=2.0, max_ms=2.0)
    never = Row("attention", "b", "float32", "fwd", "sdpa", math.nan, 0, 0, "n/a: no")
    lines = format_table(bench, [once, never])
    assert lines[2].split()[2:4] == ["1", "call"] and lines[3].split()[1:3] == ["-", "n/a:"]


def test_meaningless_columns_are_left_out_on_the_cpu():
    # what a CPU run of a bench declaring every figure gives: no flop count, no peak memory
    # (NaN), a small case whose data sat in cache (%copy above 100)
    bench = Bench("gn", "", lambda c: [], (IMPL, MS, GBPS, PCT_COPY, TFLOPS, PEAK_MIB))
    extra = {"peak_extra_MiB": math.nan}
    rows = [
        Row("gn", "big", "float32", "fwd", "genext", 2.0, 10.0, 60.0, extra=dict(extra)),
        Row("gn", "small", "float32", "fwd", "genext", 0.01, 40.0, 240.0, extra=dict(extra)),
    ]
    lines = format_table(bench, rows)
    assert lines[0].split() == ["impl", "ms", "GB/s", "%copy", "check"]
    assert lines[2].split()[-1] == "60.0" and lines[3].split()[-1] == "240.0"
    assert lines[-1].startswith("%copy above 100: faster than the measured copy rate")
    # every row above the copy rate: the column and its note stay
    lines = format_table(bench, rows[1:])
    assert "%copy" in lines[0] and lines[-1].startswith("%copy above 100")
    # every call failed: the ms column stays, with "-"
    failed = Row("gn", "x", "float32", "fwd", "genext", math.nan, 0.0, 0.0, "FAILED: boom")
    assert format_table(bench, [failed])[0].split()[:2] == ["impl", "ms"]
    # rows that move no bytes: no GB/s or %copy either; a flop count brings TFLOP/s back
    rows = [Row("gn", "x", "float32", "fwd", "genext", 2.0, 0.0, 0.0, extra={"tflops": 0.5})]
    assert format_table(bench, rows)[0].split() == ["impl", "ms", "TFLOP/s", "check"]
