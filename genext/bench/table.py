"""The table of a bench's rows, laid out by the columns the bench declares: each column as wide as
its widest cell, numbers right-aligned, then genext's speed against the fastest baseline of the
same case and direction, the check note last."""

from __future__ import annotations

import json
import math

from .registry import Bench, Column, Row, benches


def is_genext(impl: str) -> bool:
    """A row of genext's own implementation (genext, genext paged, the sampler's kernel, ...)."""
    return impl.startswith("genext") or impl == "kernel"


def is_baseline(impl: str) -> bool:
    """A row of something genext is compared against: neither genext's own nor a peer running
    genext's kernels (diffusers+patch, transformers+genext-attn)."""
    return not is_genext(impl) and "genext" not in impl and "patch" not in impl


def speedups(rows: list[Row]) -> dict[int, tuple[float, str]]:
    """For each genext row (by position in rows): (the fastest baseline's ms / its ms, that
    baseline's name), among the rows of the same bench, case, dtype and direction. Above 1:
    genext is faster. Rows without a timed baseline beside them are left out."""
    best: dict[tuple, tuple[float, str]] = {}
    for r in rows:
        if is_baseline(r.impl) and math.isfinite(r.ms) and r.ms > 0:
            key = (r.op, r.case, r.dtype, r.direction)
            if key not in best or r.ms < best[key][0]:
                best[key] = (r.ms, r.impl)
    out = {}
    for i, r in enumerate(rows):
        b = best.get((r.op, r.case, r.dtype, r.direction))
        if b and is_genext(r.impl) and math.isfinite(r.ms) and r.ms > 0:
            out[i] = (b[0] / r.ms, b[1])
    return out


def _cell(column: Column, row: Row) -> str:
    value = column.get(row)
    return format(value, column.fmt) if column.fmt else str(value)


def format_table(bench: Bench, rows: list[Row]) -> list[str]:
    """The lines of bench's table of rows (its own rows only; none when it has none)."""
    rows = [r for r in rows if r.op == bench.name]
    if not rows:
        return []
    columns = list(bench.columns)
    cells = [[_cell(c, r) for c in columns] for r in rows]
    fast = speedups(rows)
    if fast:
        columns.append(Column("vs best", "", "s"))  # right-aligned text: "1.23x sdpa"
        for i, line in enumerate(cells):
            line.append(f"{fast[i][0]:.2f}x {fast[i][1]}" if i in fast else "")
    widths = [
        max([len(c.header)] + [len(line[k]) for line in cells]) for k, c in enumerate(columns)
    ]

    def line(texts: list[str], checks: str) -> str:
        parts = [t.rjust(w) if c.fmt else t.ljust(w) for t, w, c in zip(texts, widths, columns)]
        return (" ".join(parts) + "  " + checks).rstrip()

    head = line([c.header for c in columns], "check")
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
