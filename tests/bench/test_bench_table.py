"""The tables of `genext bench`: laid out by the columns each bench declares."""

from __future__ import annotations

import json
from dataclasses import asdict

from genext.bench import Bench, Column, Row, format_table, print_saved
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
