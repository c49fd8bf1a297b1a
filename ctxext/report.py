"""Render evaluation results: Rich table, terminal plot, results.json/.csv and PNG plots."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any


def ppl_table(results: dict[str, Any]):  # -> rich.table.Table
    """One row per model/method, one column per length; the protocol in the caption."""
    from rich.table import Table

    lengths = results["config"]["lengths"]
    proto = results["protocol"].get("ppl", {})
    table = Table(
        title=f"perplexity ({proto.get('name', '-')}, token-weighted; data {results['data']['fingerprint']})",
        caption=proto.get("description"),
    )
    table.add_column("model / method")
    table.add_column("trained", justify="right")
    for n in lengths:
        table.add_column(str(n), justify="right")
    for run in results["runs"]:
        cells = []
        for n in lengths:
            res = run["ppl"].get(str(n))
            cells.append("-" if res is None else _fmt_ppl(res["ppl"]))
        table.add_row(run["label"], str(run["trained_length"]), *cells)
    return table


def passkey_table(results: dict[str, Any]):  # -> rich.table.Table | None
    from rich.table import Table

    runs = [r for r in results["runs"] if "passkey" in r]
    if not runs:
        return None
    lengths = results["config"]["lengths"]
    table = Table(title="passkey retrieval accuracy (mean over depths)")
    table.add_column("model / method")
    for n in lengths:
        table.add_column(str(n), justify="right")
    for run in runs:
        means = run["passkey"]["mean_by_length"]
        table.add_row(run["label"], *(f"{means[str(n)]:.0%}" for n in lengths))
    return table


def _fmt_ppl(value: float) -> str:
    if value is None or not math.isfinite(value):
        return "inf"
    return f"{value:.2f}" if value < 1000 else f"{value:.3g}"


def series(results: dict[str, Any]) -> list[tuple[str, list[int], list[float]]]:
    """(label, lengths, perplexities) for every run that has perplexities."""
    out = []
    for run in results["runs"]:
        pts = sorted((int(n), r["ppl"]) for n, r in run["ppl"].items() if math.isfinite(r["ppl"]))
        if pts:
            out.append((run["label"], [p[0] for p in pts], [p[1] for p in pts]))
    return out


def terminal_plot(results: dict[str, Any], width: int = 80, height: int = 18) -> str:
    """The perplexity-vs-length curve as text (plotext), log scales on both axes; "" when
    only one length was measured (the table shows it)."""
    import plotext as plt

    data = series(results)
    if len({n for _, xs, _ in data for n in xs}) < 2:
        return ""  # one length: no curve to draw (axes around one point mean nothing)
    plt.clear_figure()
    plt.plotsize(width, height)
    plt.xscale("log")
    plt.yscale("log")
    plt.title("perplexity vs context length")
    for label, xs, ys in data:
        plt.plot(xs, ys, label=label, marker="dot")
    plt.theme("clear")
    return plt.build()


def write_outputs(results: dict[str, Any], folder: Path) -> list[Path]:
    """results.json, results.csv, ppl_vs_length.png and (with passkey) passkey_heatmap.png."""
    written = [folder / "results.json", folder / "results.csv"]
    written[0].write_text(json.dumps(results, indent=2, allow_nan=True) + "\n")
    written[1].write_text(results_csv(results))
    if series(results):
        written.append(plot_ppl(results, folder / "ppl_vs_length.png"))
    if any("passkey" in r for r in results["runs"]):
        written.append(plot_passkey(results, folder / "passkey_heatmap.png"))
    return written


def results_csv(results: dict[str, Any]) -> str:
    """Long format: one line per run x task x length (x depth for passkey)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        ["label", "model", "method", "task", "length", "depth", "value", "ci_low", "ci_high",
         "n_tokens", "n_docs"]
    )  # fmt: skip
    for run in results["runs"]:
        for n, r in run["ppl"].items():
            w.writerow(
                [run["label"], run["model"], run["method"] or "base", "ppl", n, "", r["ppl"],
                 r["ci_low"], r["ci_high"], r["n_tokens"], r["n_docs"]]
            )  # fmt: skip
        pk = run.get("passkey")
        if pk:
            for i, n in enumerate(pk["lengths"]):
                for j, depth in enumerate(pk["depths"]):
                    w.writerow(
                        [run["label"], run["model"], run["method"] or "base", "passkey", n,
                         depth, pk["accuracy"][i][j], "", "", "", pk["trials"]]
                    )  # fmt: skip
    return buf.getvalue()


def pyplot() -> Any:
    """matplotlib.pyplot drawing off-screen (Agg: no display needed, e.g. on a server)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ppl(results: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, xs, ys in series(results):
        ax.plot(xs, ys, marker="o", label=label)
    trained = {r["trained_length"] for r in results["runs"]}
    for t in trained:
        ax.axvline(t, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity (log scale)")
    proto = results["protocol"].get("ppl", {}).get("name", "")
    ax.set_title(f"Perplexity vs length ({proto}; dotted: trained length)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_passkey(results: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    runs = [r for r in results["runs"] if "passkey" in r]
    fig, axes = plt.subplots(
        1, len(runs), figsize=(3.2 * len(runs) + 1, 3.6), dpi=120, squeeze=False
    )
    for ax, run in zip(axes[0], runs, strict=True):
        pk = run["passkey"]
        im = ax.imshow(
            [list(col) for col in zip(*pk["accuracy"], strict=True)],
            vmin=0,
            vmax=1,
            cmap="RdYlGn",
            aspect="auto",
        )
        ax.set_xticks(range(len(pk["lengths"])), [str(n) for n in pk["lengths"]], fontsize=7)
        ax.set_yticks(range(len(pk["depths"])), [f"{d:.0%}" for d in pk["depths"]], fontsize=7)
        ax.set_xlabel("length")
        ax.set_title(run["label"], fontsize=8)
    axes[0][0].set_ylabel("depth of the key")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
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
