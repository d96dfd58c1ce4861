"""Figures people would rather look at than read: accuracy by depth and length, chunk selection per head."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # runs headless on servers and in CI; notebooks still display the returned figures
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D


def accuracy_heatmap(grid: pd.DataFrame, label: str = "accuracy") -> Figure:
    """Passkey accuracy (or another 0-1 score, named `label`), needle depth (rows) x context length (columns), the
    field's standard picture."""
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * grid.shape[1], 1.0 + 0.35 * grid.shape[0]))
    image = ax.imshow(grid.values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(grid.shape[1]), [f"{c // 1024}k" if c >= 1024 else str(c) for c in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [f"{d:.1f}" for d in grid.index])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    return fig


def chunk_selection_heatmap(chosen: np.ndarray, num_chunks: int, highlight_chunks: list[int], title: str = "") -> Figure:
    """LongHeads' Figure 5: which chunks each head picked, one row per (layer, head), one column per chunk; for a method
    that selects per layer (InfLLM), one row per layer.

    Args:
        chosen: int array [layers, heads or selections per layer, slots] of chunk indices picked for one query token.
        num_chunks: chunks in the context (columns).
        highlight_chunks: chunks to outline (the ones holding the passkey).
    """
    layers, heads, _ = chosen.shape
    picked = np.zeros((layers * heads, num_chunks))
    for row, slots in enumerate(chosen.reshape(layers * heads, -1)):
        picked[row, slots[(slots >= 0) & (slots < num_chunks)]] = 1
    fig, ax = plt.subplots(figsize=(min(18, 3 + num_chunks * 0.12), min(14, 2 + layers * heads * 0.045)))
    ax.imshow(picked, cmap="Blues", aspect="auto", interpolation="nearest")
    for chunk in highlight_chunks:
        ax.axvspan(chunk - 0.5, chunk + 0.5, fill=False, edgecolor="red", linewidth=1.5)
    ax.set_yticks([layer * heads + heads / 2 - 0.5 for layer in range(layers)], [str(layer) for layer in range(layers)])
    ax.set_ylabel(f"layer ({heads} heads each)" if heads > 1 else "layer (one selection each)")
    ax.set_xlabel("chunk index")
    ax.set_title(title or "chunks chosen per head")
    fig.tight_layout()
    return fig


def loss_by_position_by_method(curves: pd.DataFrame, pretrained_length: int | None = None) -> Figure:
    """PG19 mean NLL by token position, one panel per segment length, one curve per method.

    `curves` has columns label, length, bucket_start, mean_nll (`longctx.aggregate.load_curves`). A method that
    extends the context keeps its curve flat past the pretrained length; one that does not turns up there.
    """
    lengths = sorted(curves["length"].unique())
    labels = sorted(curves["label"].unique())
    palette = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]  # past 10 methods tab10 would repeat colours
    colors = {label: palette(index) for index, label in enumerate(labels)}  # same in every panel
    figure = Figure(figsize=(3.6 * len(lengths) + 1.5, 3.6), layout="constrained")
    axes = figure.subplots(1, len(lengths), sharey=True, squeeze=False)[0]
    for ax, length in zip(axes, lengths):
        for label, curve in curves[curves["length"] == length].groupby("label"):
            ax.plot(curve["bucket_start"], curve["mean_nll"], marker=".", markersize=3, color=colors[label], label=label)
        if pretrained_length and pretrained_length < length:
            ax.axvline(pretrained_length, color="grey", linestyle=":")
        ax.set_title(f"{length // 1024}k tokens" if length >= 1024 else f"{length} tokens")
        ax.set_xlabel("token position in segment")
    axes[0].set_ylabel("mean NLL (nats)")
    handles = [Line2D([], [], color=color, marker=".", label=label) for label, color in colors.items()]
    figure.legend(handles=handles, loc="outside right upper")
    return figure


def _palette(lines: list[str]) -> dict[str, tuple]:
    """One colour per line, the same in every panel (tab20 past 10 lines, where tab10 would repeat colours)."""
    palette = matplotlib.colormaps["tab10" if len(lines) <= 10 else "tab20"]
    return {line: palette(index % palette.N) for index, line in enumerate(lines)}


def _length_axis(ax, lengths, pretrained_length: int | None) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{length // 1024}k" if length >= 1024 else str(length) for length in lengths])
    ax.minorticks_off()
    if pretrained_length:
        ax.axvline(pretrained_length, color="grey", linestyle=":")
    ax.set_xlabel("context length (tokens)")


def _lines_with_intervals(ax, points: pd.DataFrame, colors: dict[str, tuple]) -> None:
    for line, group in points.groupby("line", sort=True):
        group = group.sort_values("length")
        below = (group["value"] - group["low"]).clip(lower=0).fillna(0)
        above = (group["high"] - group["value"]).clip(lower=0).fillna(0)
        ax.errorbar(group["length"], group["value"], yerr=[below, above], marker="o", markersize=4, capsize=3,
                    color=colors[line], label=line)


def score_by_length(points: pd.DataFrame, ylabel: str, pretrained_length: int | None = None,
                    logy: bool = False) -> Figure:
    """A metric against context length, one line per method, its 95% interval as error bars. `points` has columns
    line, length, value, low, high (`longctx.report`); a dotted line marks the pretrained length."""
    lines = sorted(points["line"].unique())
    figure = Figure(figsize=(7.5, 4.0), layout="constrained")
    ax = figure.subplots()
    _lines_with_intervals(ax, points, _palette(lines))
    _length_axis(ax, sorted(points["length"].unique()), pretrained_length)
    if logy:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    figure.legend(loc="outside right upper", fontsize=7)
    return figure


def score_by_length_per_panel(points: pd.DataFrame, ylabel: str, pretrained_length: int | None = None) -> Figure:
    """`score_by_length` with one panel per value of `points.panel` (RULER's tasks, LongBench's datasets)."""
    panels = list(dict.fromkeys(points["panel"]))
    lines = sorted(points["line"].unique())
    colors = _palette(lines)
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(3.4 * columns + 2.5, 2.8 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, sharey=True, squeeze=False).ravel()
    lengths = sorted(points["length"].unique())
    for ax, panel in zip(axes, panels):
        _lines_with_intervals(ax, points[points["panel"] == panel], colors)
        _length_axis(ax, lengths, pretrained_length)
        ax.set_title(panel, fontsize=9)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax in axes[::columns]:
        ax.set_ylabel(ylabel)
    handles = [Line2D([], [], color=color, marker="o", label=line) for line, color in colors.items()]
    figure.legend(handles=handles, loc="outside right upper", fontsize=7)
    return figure


def prefill_by_length(points: pd.DataFrame, slopes: pd.DataFrame) -> Figure:
    """Prefill seconds against length on log-log axes, one line per method, its fitted slope in the legend (1: linear
    cost, 2: quadratic). `points`: line, length, prefill_s; `slopes`: line, slope."""
    lines = sorted(points["line"].unique())
    colors = _palette(lines)
    slope = dict(zip(slopes["line"], slopes["slope"]))
    figure = Figure(figsize=(7.5, 4.0), layout="constrained")
    ax = figure.subplots()
    for line, group in points.groupby("line", sort=True):
        group = group.sort_values("length")
        label = f"{line} (slope {slope[line]:.2f})" if line in slope else line
        ax.plot(group["length"], group["prefill_s"], marker="o", color=colors[line], label=label)
    _length_axis(ax, sorted(points["length"].unique()), None)
    ax.set_yscale("log")
    ax.set_ylabel("prefill (s)")
    figure.legend(loc="outside right upper", fontsize=7)
    return figure
