"""The table of a bench's rows, laid out by the columns the bench declares: each column as wide as
its widest cell, numbers right-aligned, the check note last."""

from __future__ import annotations

import json

from .registry import Bench, Column, Row, benches


def _cell(column: Column, row: Row) -> str:
    value = column.get(row)
    return format(value, column.fmt) if column.fmt else str(value)


def format_table(bench: Bench, rows: list[Row]) -> list[str]:
    """The lines of bench's table of rows (its own rows only; none when it has none)."""
    rows = [r for r in rows if r.op == bench.name]
    if not rows:
        return []
    cells = [[_cell(c, r) for c in bench.columns] for r in rows]
    widths = [
        max([len(c.header)] + [len(line[k]) for line in cells]) for k, c in enumerate(bench.columns)
    ]

    def line(texts: list[str], checks: str) -> str:
        parts = [
            t.rjust(w) if c.fmt else t.ljust(w) for t, w, c in zip(texts, widths, bench.columns)
        ]
        return (" ".join(parts) + "  " + checks).rstrip()

    head = line([c.header for c in bench.columns], "check")
    return [head, "-" * len(head)] + [line(t, r.check) for t, r in zip(cells, rows)]


def print_table(bench: Bench, rows: list[Row]) -> None:
    lines = format_table(bench, rows)
    if lines:
        print("\n" + "\n".join(lines), flush=True)


def print_saved(path: str) -> None:
    """The tables of a `genext bench --json` file, one per registered bench in it."""
    with open(path) as f:
        rows = [Row(**r) for r in json.load(f)["rows"]]
    for bench in benches().values():
        print_table(bench, rows)
