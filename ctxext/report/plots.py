"""Plots: the terminal curve (plotext) and the PNG figures (matplotlib, off-screen) of eval
results, a fine-tune's loss and tune's leaderboard."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ctxext.report.cells import METRIC_LABELS, metric, series


def pyplot() -> Any:
    """matplotlib.pyplot drawing off-screen (Agg: no display needed, e.g. on a server)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def terminal_plot(results: dict[str, Any], width: int = 80, height: int = 18) -> str:
    """The perplexity-vs-length curve as text (plotext), log scales on both axes; "" when
    only one length was measured (the table shows it)."""
    import plotext as plt

    which = metric(results)
    data = series(results, which)
    if len({n for _, xs, _ in data for n in xs}) < 2:
        return ""  # one length: no curve to draw (axes around one point mean nothing)
    plt.clear_figure()
    plt.plotsize(width, height)
    plt.xscale("log")
    plt.yscale("log")
    plt.title(f"{METRIC_LABELS[which]} vs context length")
    for label, xs, ys in data:
        plt.plot(xs, ys, label=label, marker="dot")
    plt.theme("clear")
    return plt.build()


def plot_ppl(results: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    which = metric(results)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, xs, ys in series(results, which):
        ax.plot(xs, ys, marker="o", label=label)
    trained = {r["trained_length"] for r in results["runs"]}
    for t in trained:
        ax.axvline(t, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"{METRIC_LABELS[which]} (log scale)")
    proto = results["protocol"].get("ppl", {})
    docs = " docs" if proto.get("doc_selection") == "same" else ""
    selection = f", {proto.get('doc_selection', '')}{docs}" if proto.get("doc_selection") else ""
    ax.set_title(
        f"{METRIC_LABELS[which].capitalize()} vs length ({proto.get('name', '')}{selection}; "
        "dotted: trained length)"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_passkey(results: dict[str, Any], path: Path) -> Path:
    return plot_retrieval(results, "passkey", path)


def plot_context_use(results: dict[str, Any], path: Path) -> Path:
    """Far-context gain by position bucket at the longest length, one line per run."""
    plt = pyplot()
    runs = [r for r in results["runs"] if r.get("context_use")]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120, layout="constrained")
    window = None
    for run in runs:
        longest = max(run["context_use"], key=int)
        res = run["context_use"][longest]
        window = res["window"]
        far = [b for b in res["buckets"] if b["end"] > window + 1]
        xs = [b["end"] for b in far]
        ax.plot(xs, [b["gain_bits"] for b in far], marker="o", label=f"{run['label']} @{longest}")
        ax.fill_between(xs, [b["ci_low"] for b in far], [b["ci_high"] for b in far], alpha=0.15)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ends = sorted({b["end"] for r in runs for g in r["context_use"].values() for b in g["buckets"]})
    ax.set_xticks(ends, [str(e) for e in ends])
    ax.minorticks_off()
    ax.set_xlabel("position bucket (its end, tokens)")
    ax.set_ylabel("gain from text > window back (bits/token)")
    ax.set_title(f"Far-context gain by position (local window {window}; band: 95% CI)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_retrieval(results: dict[str, Any], key: str, path: Path) -> Path:
    """Accuracy heatmaps (depth x length), one panel per run, each cell labelled."""
    plt = pyplot()
    runs = [r for r in results["runs"] if key in r]
    cols = min(len(runs), 3)
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(3.4 * cols + 0.8, 2.9 * rows + 0.4),
        dpi=120,
        squeeze=False,
        layout="constrained",
    )
    im = None
    for ax, run in zip(axes.flat, runs, strict=False):
        res = run[key]
        grid = [list(col) for col in zip(*res["accuracy"], strict=True)]  # depth x length
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(res["lengths"])), [str(n) for n in res["lengths"]], fontsize=7)
        ax.set_yticks(range(len(res["depths"])), [f"{d:.0%}" for d in res["depths"]], fontsize=7)
        ax.set_xlabel("context length (tokens)", fontsize=8)
        ax.set_ylabel("depth of the key", fontsize=8)
        ax.set_title(run["label"], fontsize=8)
    for ax in list(axes.flat)[len(runs) :]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="accuracy")
    fig.savefig(path)
    plt.close(fig)
    return path


def loss_figure(rows: list[dict[str, Any]]) -> Any:  # -> matplotlib Figure
    """Training loss per optimizer step; from 40 steps on also a moving average over 1/20th of
    the run (a shorter run shows its raw loss plainly: an average of 1 step would hide it)."""
    plt = pyplot()
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    window = len(rows) // 20
    fig, ax = plt.subplots(figsize=(7, 4))
    if window >= 2:
        ax.plot(steps, losses, alpha=0.35, label="loss")
        smooth = [
            sum(losses[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1))
            for i in range(len(losses))
        ]
        ax.plot(steps, smooth, label=f"moving average ({window} steps)")
    else:
        ax.plot(steps, losses, marker="o", label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("ctxext finetune")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_loss(rows: list[dict[str, Any]], png_path: Path) -> Path | None:
    """loss.png of a fine-tune's log records (nothing when there are none)."""
    if not rows:
        return None
    fig = loss_figure(rows)
    fig.savefig(png_path, dpi=100)
    pyplot().close(fig)
    return png_path


def plot_leaderboard(lines: list[dict[str, Any]], target: int, trained: int, path: Path) -> Path:
    """Horizontal bars: perplexity at the target (and at the trained length) per row."""
    import numpy as np

    plt = pyplot()
    labels = [r["label"] for r in lines][::-1]
    y = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(7.5, 0.4 * len(labels) + 1.5), dpi=120)
    ax.barh(y + 0.2, [r["ppl_target"] for r in lines][::-1], 0.4, label=f"ppl @ {target}")
    ax.barh(y - 0.2, [r["ppl_trained"] for r in lines][::-1], 0.4, label=f"ppl @ {trained}")
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel("perplexity on the report documents (lower is better)")
    ax.set_title("ctxext tune leaderboard (report documents, unseen by the search)")
    ax.legend(fontsize=8)
    ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
