"""Report figures: matplotlib (Agg) rendered to SVG and embedded as data URIs (no network, no JavaScript)."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

# One palette for the whole report: kept = blue, dropped = light red, before/after = grey/blue.
BLUE, RED, GREY, ORANGE = "#2f6db5", "#e08a7e", "#9aa3ad", "#d9822b"
STYLE = {
    "svg.fonttype": "none", "svg.hashsalt": "lvd-report", "font.size": 9, "axes.spines.top": False,
    "axes.spines.right": False, "axes.titlesize": 10, "axes.titleweight": "bold", "figure.dpi": 100,
}  # fmt: skip


def log_y(ax: plt.Axes) -> None:
    """Log y axis with plain tick labels (1, 2, 5, 10, ...) and counts of 1 still visible as bars."""
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.5)
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else ""))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def svg_uri(fig: plt.Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode()


def funnel(stages: Sequence[str], kept: Sequence[int], dropped: Sequence[int]) -> str:
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(stages) + 0.8))
        y = np.arange(len(stages))[::-1]
        ax.barh(y, kept, color=BLUE, label="continues")
        ax.barh(y, dropped, left=kept, color=RED, label="dropped here")
        top = max([k + d for k, d in zip(kept, dropped, strict=True)] or [1])
        for yi, k, d in zip(y, kept, dropped, strict=True):
            ax.text(k + d + top * 0.01, yi, f"{k:,}" + (f"  (-{d:,})" if d else ""), va="center", fontsize=8)
        ax.set_yticks(y, stages)
        ax.set_xlim(0, top * 1.22)
        ax.set_xlabel("images (input rows)")
        ax.legend(loc="lower right", frameon=False, fontsize=8)
        return svg_uri(fig)


def histogram(values: np.ndarray, bins: np.ndarray, xlabel: str, threshold: float | None = None,
              log: bool = True, color: str = BLUE) -> str:  # fmt: skip
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5.2, 2.6))
        ax.hist(values, bins=bins, color=color)
        if log:
            log_y(ax)
        if threshold is not None:
            ax.axvline(threshold, color=ORANGE, ls="--", lw=1.2, label=f"threshold {threshold:g}")
            ax.legend(frameon=False, fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("images" + (" (log)" if log else ""))
        return svg_uri(fig)


def component_sizes(sizes: np.ndarray) -> str:
    """Bar chart of how many duplicate components have each size (1 = unique image)."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5.2, 2.6))
        values, counts = np.unique(sizes, return_counts=True)
        ax.bar([str(v) for v in values], counts, color=BLUE)
        log_y(ax)
        ax.set_xlabel("component size (images)")
        ax.set_ylabel("components (log)")
        return svg_uri(fig)


def cluster_sizes(levels: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """Per level: cluster sizes sorted decreasingly, before and after rebalancing (log y)."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(levels), figsize=(3.6 * len(levels), 2.7), squeeze=False)
        for ax, (name, (before, after)) in zip(axes[0], levels.items(), strict=True):
            ax.plot(np.arange(1, len(before) + 1), np.sort(before)[::-1], color=GREY, lw=2, label="before")
            ax.plot(np.arange(1, len(after) + 1), np.sort(after)[::-1], color=BLUE, lw=1.4, ls="--", label="after")
            log_y(ax)
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.set_title(name)
            ax.set_xlabel("cluster rank")
            ax.set_ylabel("images")
            ax.legend(frameon=False, fontsize=8)
        fig.tight_layout()
        return svg_uri(fig)


def curves(metrics: pd.DataFrame, panels: Sequence[tuple[str, Sequence[str]]],
           labels: Mapping[str, str] | None = None) -> str:  # fmt: skip
    """Small multiples of per-step training metrics; ``panels``: (title, columns); ``labels``: legend text by column."""
    labels = labels or {}
    n = len(panels)
    cols = min(4, n)
    rows = -(-n // cols)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.4 * rows), squeeze=False)
        for ax in axes.ravel()[n:]:
            ax.set_visible(False)
        x = metrics["step"].to_numpy()
        for ax, (title, columns) in zip(axes.ravel(), panels, strict=False):
            for i, c in enumerate(columns):  # dashed second lines: curves that coincide stay visible
                ax.plot(x, metrics[c].to_numpy(), lw=1.2, label=labels.get(c, c),
                        color=[BLUE, ORANGE, GREY, RED, "#5a9e6f"][i % 5], ls="-" if i % 2 == 0 else "--")
            ax.set_title(title)
            ax.set_xlabel("step")
            if len(columns) > 1:
                ax.legend(frameon=False, fontsize=8)
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
        fig.tight_layout()
        return svg_uri(fig)
