"""The table of a bench's rows, laid out by the columns the bench declares: each column as wide as
its widest cell, numbers right-aligned, then the spread of each row's timed calls, genext's speed
against the fastest baseline of the same case and direction, the check note last."""

from __future__ import annotations

import json
import math

from .registry import MS, PCT_COPY, Bench, Column, Row, benches


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
    if not column.shows(row):
        return "-"
    value = column.get(row)
    return format(value, column.fmt) if column.fmt else str(value)


def spread_text(row: Row) -> str:
    """A row's spread cell: its IQR in % of the median, "noisy" after it when the rule
    (harness.NOISY_IQR_PCT) flags the row; "1 call" for a row timed once (a quick run of a slow
    bench: no spread to measure), empty for rows that were not timed."""
    if row.iqr_pct is None or not math.isfinite(row.iqr_pct):
        timed = row.min_ms is not None and math.isfinite(row.min_ms)
        return "1 call" if timed else ""
    return f"{row.iqr_pct:.1f}" + (" noisy" if row.noisy else "")


def format_table(bench: Bench, rows: list[Row]) -> list[str]:
    """The lines of bench's table of rows (its own rows only; none when it has none).

    Columns: the bench's own, less any whose every cell is meaningless here (no flop count, no
    peak memory on the CPU); then the spread of each row's timed calls ("iqr%",
    flagged "noisy" by the harness's rule), genext's speed against the fastest baseline ("vs
    best"), and the check."""
    rows = [r for r in rows if r.op == bench.name]
    if not rows:
        return []
    # ms stays even when no row has a time (every call failed): the table says so with "-"
    columns = [c for c in bench.columns if c is MS or any(c.shows(r) for r in rows)]
    cells = [[_cell(c, r) for c in columns] for r in rows]
    spreads = [spread_text(r) for r in rows]
    if any(spreads):
        columns.append(Column("iqr%", "", "s"))  # right-aligned text: "3.2", "31.0 noisy"
        for line, text in zip(cells, spreads):
            line.append(text)
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
    lines = [head, "-" * len(head)] + [line(t, r.check) for t, r in zip(cells, rows)]
    if any(c is PCT_COPY for c in columns) and any(
        math.isfinite(r.pct_copy) and r.pct_copy > 100 for r in rows
    ):
        lines.append(
            "%copy above 100: faster than the measured copy rate (the data sat in a cache, or the "
            "kernel only reads)"
        )
    return lines


def print_table(bench: Bench, rows: list[Row]) -> None:
    lines = format_table(bench, rows)
    if lines:
        print("\n" + "\n".join(lines), flush=True)


_FLOATS = ("ms", "gbps", "pct_copy", "min_ms", "max_ms", "iqr_pct")


def row_from_json(record: dict) -> Row:
    """A Row from its JSON record (strict JSON writes NaN as null: read back as NaN)."""
    record = dict(record)
    for key in _FLOATS:
        if key in record and record[key] is None:
            record[key] = math.nan
    record["extra"] = {k: math.nan if v is None else v for k, v in record.get("extra", {}).items()}
    return Row(**record)


def print_saved(path: str) -> None:
    """The tables of a `genext bench --json` file, one per registered bench in it."""
    with open(path) as f:
        rows = [row_from_json(r) for r in json.load(f)["rows"]]
    for bench in benches().values():
        print_table(bench, rows)


def plot_speedups(rows: list[Row], path: str, title: str | None = None) -> None:
    """A figure of genext's speed against the fastest baseline, one panel per op: a bar per case,
    dtype, direction (and genext implementation where a case has several), green where genext is
    faster, red where it is slower, hatched where the genext row or its baseline is noisy, a line
    at 1.0; `title` above the panels. Needs matplotlib (the ``plot`` extra: ``pip install genext[plot]``)."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(
            "genext bench --plot needs matplotlib: pip install 'genext[plot]' (or matplotlib)"
        ) from e
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fast = speedups(rows)
    noisy_baseline = {(r.op, r.case, r.dtype, r.direction, r.impl): r.noisy for r in rows}
    ops = list(dict.fromkeys(rows[i].op for i in fast))
    if not ops:
        raise ValueError("genext bench --plot: no genext row has a timed baseline to compare with")
    bars = [sum(rows[i].op == op for i in fast) for op in ops]
    fig, axes = plt.subplots(
        len(ops),
        1,
        figsize=(8, max(2.0, sum(0.7 + 0.2 * n for n in bars)) + (0.3 if title else 0)),
        gridspec_kw={"height_ratios": [0.7 + 0.2 * n for n in bars]},
        squeeze=False,
    )
    axes = list(axes[:, 0])
    for ax, op in zip(axes, ops):
        picks = [(rows[i], *fast[i]) for i in fast if rows[i].op == op]
        # a ratio is rough when either of its two rows is noisy
        rough = [
            r.noisy or noisy_baseline.get((r.op, r.case, r.dtype, r.direction, b), False)
            for r, _, b in picks
        ]
        several = len({(r.case, r.dtype, r.direction) for r, _, _ in picks}) < len(picks)
        labels = [
            f"{r.case} {r.dtype} {r.direction}" + (f" {r.impl}" if several else "")
            for r, _, _ in picks
        ]
        ratios = [ratio for _, ratio, _ in picks]
        colors = ["tab:green" if x >= 1 else "tab:red" for x in ratios]
        ypos = range(len(picks))
        hatches = ["//" if x else "" for x in rough]
        ax.barh(ypos, ratios, color=colors, hatch=hatches, edgecolor="white", left=0)
        ax.axvline(1.0, color="black", linewidth=1)
        ax.set_yticks(list(ypos), labels, fontsize=7)
        ax.invert_yaxis()
        for y, (_, ratio, base) in zip(ypos, picks):
            noisy = " (noisy)" if rough[y] else ""
            ax.text(ratio, y, f" {ratio:.2f}x {base}{noisy}", va="center", fontsize=6)
        ax.set_xlim(0, max(ratios + [1.0]) * 1.35)
        ax.set_title(
            f"{op}: genext speed-up over the fastest baseline (>1: genext faster)", fontsize=8
        )
        ax.tick_params(axis="x", labelsize=7)
    axes[-1].set_xlabel("speed-up (baseline ms / genext ms)", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
