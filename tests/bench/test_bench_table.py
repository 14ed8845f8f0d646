"""The tables of `genext bench`: laid out by the columns each bench declares."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

import pytest

from genext.bench import Bench, Column, Row, busy_core, format_table, print_saved, speedups
from genext.bench.registry import IMPL, MS, TFLOPS

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
        "B1             flash-attention   nan     nan  nan  n/a: no",
    ]


def test_no_rows_no_table():
    assert format_table(BENCH, _rows()[1:2]) == []


def test_saved_json_prints_the_same_table(tmp_path, capsys, monkeypatch):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"env": {}, "rows": [asdict(r) for r in _rows()]}))
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
