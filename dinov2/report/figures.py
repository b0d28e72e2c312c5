"""The report's plots, drawn with matplotlib's object API (no pyplot state) and returned as PNG bytes."""

import io
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

DPI = 100
KEPT_COLOUR = "#d62728"
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def loss_curves(history: dict[str, np.ndarray], title: str) -> bytes:
    """Every ``*loss`` column of a run's ``plots/train.csv`` against the step; the total in black."""
    figure = Figure(figsize=(6, 3.6), layout="constrained")
    axis = figure.subplots()
    steps = history["step"]
    parts = sorted(name for name in history if name.endswith("loss") and name != "total_loss")
    for colour, name in zip(PALETTE * (len(parts) // len(PALETTE) + 1), parts, strict=False):
        axis.plot(steps, history[name], color=colour, linewidth=1.2, label=name)
    if "total_loss" in history:
        axis.plot(steps, history["total_loss"], color="black", linewidth=2, label="total_loss")
    axis.set(xlabel="iteration", ylabel="loss", title=title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2 if len(parts) > 3 else 1)
    return _png(figure)


def knn_change(rows: list[tuple[str, float | None, float | None]]) -> bytes:
    """One line per model from its kNN top-1 at initialisation (open circle) to the end of training (dot)."""
    figure = Figure(figsize=(6, 0.8 + 0.55 * len(rows)), layout="constrained")
    axis = figure.subplots()
    for y, (_, init, end) in enumerate(rows):
        if init is not None and end is not None:
            axis.annotate("", (100 * end, y), (100 * init, y), arrowprops={"arrowstyle": "->", "color": "grey"})
        if init is not None:
            axis.plot(100 * init, y, "o", markerfacecolor="white", markeredgecolor=PALETTE[0], markersize=8)
        if end is not None:
            axis.plot(100 * end, y, "o", color=PALETTE[0], markersize=8)
    axis.set_yticks(range(len(rows)), [label for label, _, _ in rows])
    axis.set_ylim(len(rows) - 0.5, -0.5)
    axis.set_xlabel("kNN top-1, k=20 (%)   o init   \u25cf end")
    axis.grid(axis="x", alpha=0.3)
    return _png(figure)


def distractor_shares(shares: dict[str, float]) -> bytes:
    """Share of out-of-domain distractors at each step of curation (pool, after dedup, curated)."""
    figure = Figure(figsize=(4, 2.6), layout="constrained")
    axis = figure.subplots()
    names = list(shares)
    values = [100 * shares[name] for name in names]
    bars = axis.bar(names, values, color=[PALETTE[1], PALETTE[3], PALETTE[2]][: len(names)])
    axis.bar_label(bars, [f"{value:.1f}%" for value in values], fontsize=8)
    axis.set(ylabel="distractors (%)", title="out-of-domain share")
    axis.set_ylim(0, max(values + [1.0]) * 1.25)
    return _png(figure)


@dataclass
class Cell:
    image: np.ndarray | None  # HxWx3 uint8; None draws an empty, labelled cell
    caption: str
    kept: bool = False


def image_rows(rows: list[tuple[str, list[Cell]]], cell_inches: float = 1.25) -> bytes:
    """A grid of thumbnails, one row per group with its title on the left; kept images framed in red."""
    columns = max(len(cells) for _, cells in rows)
    figure = Figure(figsize=(1.6 + columns * cell_inches, len(rows) * (cell_inches + 0.45)), layout="constrained")
    axes = np.atleast_2d(figure.subplots(len(rows), columns, squeeze=False))
    for (title, cells), row_axes in zip(rows, axes, strict=True):
        for column, axis in enumerate(row_axes):
            axis.set_xticks([])
            axis.set_yticks([])
            if column >= len(cells):
                axis.set_axis_off()
                continue
            cell = cells[column]
            if cell.image is not None:
                axis.imshow(cell.image, interpolation="nearest")
            axis.set_title(cell.caption, fontsize=7, color=KEPT_COLOUR if cell.kept else "black")
            for spine in axis.spines.values():
                spine.set_color(KEPT_COLOUR if cell.kept else "#bbbbbb")
                spine.set_linewidth(3 if cell.kept else 0.8)
        row_axes[0].set_ylabel(title, fontsize=8, rotation=0, ha="right", va="center", labelpad=8)
    return _png(figure)
