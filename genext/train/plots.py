"""PNG figures of a run: the loss curve and a grid of images (matplotlib, Agg backend)."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from ._deps import require

__all__ = ["save_image_grid", "save_loss_curve", "save_metric_plot"]


def _pyplot():
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")  # files only: no display needed, none opened
    return require("matplotlib.pyplot")


def save_loss_curve(
    path: str | os.PathLike, history: dict[str, list[float]], title: str = ""
) -> None:
    """One panel per logged series (log-scaled y when positive), raw values faint and a moving
    average over about 2% of the steps on top."""
    plt = _pyplot()
    names = list(history)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3), squeeze=False)
    for ax, name in zip(axes[0], names):
        y = np.asarray(history[name], dtype=np.float64)
        x = np.arange(1, len(y) + 1)
        ax.plot(x, y, alpha=0.3, lw=0.8)
        w = max(1, len(y) // 50)
        if len(y) >= w > 1:
            ax.plot(x[w - 1 :], np.convolve(y, np.ones(w) / w, mode="valid"), lw=1.5)
        if len(y) and (y > 0).all():
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_image_grid(
    path: str | os.PathLike,
    rows: list[Tensor],
    titles: list[str] | None = None,
    scale: int | None = None,
) -> None:
    """Save rows of images ``(n, C, H, W)`` in [-1, 1] (clipped) as one PNG, each pixel
    ``scale`` x ``scale`` (nearest; default: images about 32 pixels high), one labelled row per
    tensor."""
    plt = _pyplot()
    scale = scale or max(1, 32 // rows[0].shape[-2])
    titles = titles or [""] * len(rows)
    strips = []
    for row in rows:
        x = ((row.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
        x = torch.nn.functional.pad(x, (0, 0, 1, 1, 1, 1), value=1.0)  # a white frame per image
        strips.append(torch.cat(list(x), dim=1).numpy())  # (H, n W, C)
    h, w, c = strips[0].shape
    fig, axes = plt.subplots(
        len(rows), 1, figsize=(w * scale / 80, (h * scale + 14) * len(rows) / 80), squeeze=False
    )
    for ax, strip, title in zip(axes[:, 0], strips, titles):
        ax.imshow(strip[..., 0] if c == 1 else strip, cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_metric_plot(
    path: str | os.PathLike,
    x: list[float] | list[str],
    left: dict[str, list[float]],
    right: dict[str, list[float]] | None = None,
    xlabel: str = "",
    left_label: str = "",
    right_label: str = "",
    title: str = "",
) -> None:
    """Lines (markers at each point) of ``left``'s series against ``x`` on the left axis and of
    ``right``'s (dashed) on a second axis; ``x`` may be labels (categorical)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    pos = list(range(len(x))) if isinstance(x[0], str) else list(x)
    for name, y in left.items():
        ax.plot(pos, y, "o-", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(left_label)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if right:
        ax2 = ax.twinx()
        for i, (name, y) in enumerate(right.items()):
            ax2.plot(pos, y, "s--", color=f"C{len(left) + i}", label=name)
        ax2.set_ylabel(right_label)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if isinstance(x[0], str):
        ax.set_xticks(pos, x)
    ax.legend(handles, labels, fontsize=8, loc="best")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
