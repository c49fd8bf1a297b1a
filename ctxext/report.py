"""Render evaluation results: Rich table, terminal plot, results.json/.csv and PNG plots."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any


def metric(results: dict[str, Any]) -> str:
    """'ppl', or 'bpb' (bits per byte) when the rows' tokenizers split the data differently.

    Perplexity is per token, so it compares only rows that score the same tokens; bits per
    byte is per byte of text and compares across tokenizers.
    """
    prints = {r.get("tokens_fingerprint") for r in results["runs"] if r.get("ppl")}
    return "bpb" if len(prints) > 1 else "ppl"


def _value(res: dict[str, Any], which: str) -> float | None:
    return res.get("bits_per_byte") if which == "bpb" else res.get("ppl")


def _title(results: dict[str, Any], which: str) -> str:
    proto = results["protocol"].get("ppl", {})
    what = (
        "bits per byte (rows use different tokenizers, so perplexities do not compare)"
        if which == "bpb"
        else "perplexity"
    )
    selection = proto.get("doc_selection")
    docs = "" if selection is None else f"; documents: {selection}"
    return (
        f"{what} ({proto.get('name', '-')}, token-weighted{docs}; "
        f"data {results['data']['fingerprint']})"
    )


def ppl_table(results: dict[str, Any]):  # -> rich.table.Table
    """One row per model/method, one column per length; the protocol in the caption.

    Shows bits per byte instead of perplexity when the rows use different tokenizers.
    """
    from rich.table import Table

    which = metric(results)
    lengths = results["config"]["lengths"]
    proto = results["protocol"].get("ppl", {})
    table = Table(title=_title(results, which), caption=proto.get("description"))
    table.add_column("model / method")
    table.add_column("trained", justify="right")
    for n in lengths:
        table.add_column(str(n), justify="right")
    for run in results["runs"]:
        cells = []
        for n in lengths:
            res = run["ppl"].get(str(n))
            cells.append("-" if res is None else _fmt(_value(res, which), which))
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


def _fmt(value: float | None, which: str) -> str:
    if which == "bpb":
        return "-" if value is None else "inf" if not math.isfinite(value) else f"{value:.3f}"
    return _fmt_ppl(value)


def _fmt_ppl(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "inf"
    return f"{value:.2f}" if value < 1000 else f"{value:.3g}"


def series(
    results: dict[str, Any], which: str | None = None
) -> list[tuple[str, list[int], list[float]]]:
    """(label, lengths, values) for every run that has them; values are perplexities, or bits
    per byte when ``which`` (default: :func:`metric`) says so."""
    which = which or metric(results)
    out = []
    for run in results["runs"]:
        pts = sorted(
            (int(n), v)
            for n, r in run["ppl"].items()
            if (v := _value(r, which)) is not None and math.isfinite(v)
        )
        if pts:
            out.append((run["label"], [p[0] for p in pts], [p[1] for p in pts]))
    return out


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
    plt.title(f"{_LABELS[which]} vs context length")
    for label, xs, ys in data:
        plt.plot(xs, ys, label=label, marker="dot")
    plt.theme("clear")
    return plt.build()


_LABELS = {"ppl": "perplexity", "bpb": "bits per byte"}


def strict_json(results: dict[str, Any]) -> dict[str, Any]:
    """A copy that strict JSON can hold: inf/nan become null, each listed in ``notes``."""
    notes: list[str] = []

    def clean(value: Any, where: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            notes.append(f"{where} was {value} (written as null)")
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    out = {k: clean(v, k) for k, v in results.items()}
    if notes:
        out["notes"] = [*results.get("notes", []), *notes]
    return out


def write_outputs(results: dict[str, Any], folder: Path) -> list[Path]:
    """results.json, results.csv, ppl_vs_length.png and, with those tasks, passkey_heatmap.png,
    retrieval_heatmap.png and context_use.png."""
    written = [folder / "results.json", folder / "results.csv"]
    written[0].write_text(json.dumps(strict_json(results), indent=2, allow_nan=False) + "\n")
    written[1].write_text(results_csv(results))
    if series(results):
        written.append(plot_ppl(results, folder / "ppl_vs_length.png"))
    if any("passkey" in r for r in results["runs"]):
        written.append(plot_passkey(results, folder / "passkey_heatmap.png"))
    if any("retrieval" in r for r in results["runs"]):
        written.append(plot_retrieval(results, "retrieval", folder / "retrieval_heatmap.png"))
    if any(r.get("context_use") for r in results["runs"]):
        written.append(plot_context_use(results, folder / "context_use.png"))
    return written


def results_csv(results: dict[str, Any]) -> str:
    """Long format: one line per run x task x length (x depth for passkey)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        ["label", "model", "method", "task", "length", "depth", "value", "ci_low", "ci_high",
         "n_tokens", "n_docs", "n_bytes", "bits_per_byte", "bytes_per_token"]
    )  # fmt: skip
    for run in results["runs"]:
        for n, r in run["ppl"].items():
            w.writerow(
                [run["label"], run["model"], run["method"] or "base", "ppl", n, "", r["ppl"],
                 r["ci_low"], r["ci_high"], r["n_tokens"], r["n_docs"], r.get("n_bytes"),
                 r.get("bits_per_byte"), r.get("bytes_per_token")]
            )  # fmt: skip
        pk = run.get("passkey")
        if pk:
            for i, n in enumerate(pk["lengths"]):
                for j, depth in enumerate(pk["depths"]):
                    w.writerow(
                        [run["label"], run["model"], run["method"] or "base", "passkey", n,
                         depth, pk["accuracy"][i][j], "", "", "", pk["trials"]]
                    )  # fmt: skip
        rt = run.get("retrieval")
        if rt:
            for i, n in enumerate(rt["lengths"]):
                for j, depth in enumerate(rt["depths"]):
                    w.writerow(
                        [run["label"], run["model"], run["method"] or "base",
                         f"retrieval-{rt['template']}", n, depth, rt["accuracy"][i][j], "", "",
                         "", rt["trials"]]
                    )  # fmt: skip
        for n, g in (run.get("context_use") or {}).items():
            last = g["buckets"][-1]
            w.writerow(
                [run["label"], run["model"], run["method"] or "base", "far-context-gain-bits",
                 n, "", last["gain_bits"], last["ci_low"], last["ci_high"], last["n_tokens"],
                 g["n_docs"]]
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
    ax.set_ylabel(f"{_LABELS[which]} (log scale)")
    proto = results["protocol"].get("ppl", {})
    docs = " docs" if proto.get("doc_selection") == "same" else ""
    selection = f", {proto.get('doc_selection', '')}{docs}" if proto.get("doc_selection") else ""
    ax.set_title(
        f"{_LABELS[which].capitalize()} vs length ({proto.get('name', '')}{selection}; "
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


# ---------------------------------------------------------------------------------------------
# Context use: far-context gain, retrieval, effective context length


def effective_length_line(run: dict[str, Any]) -> str | None:
    """ "extended to 2048, reads to 1024" (or "reads to no evaluated length")."""
    if "effective_length" not in run:
        return None
    reach = run["effective_length"]
    read = f"reads to {reach}" if reach else "reads to none of the lengths"
    return f"{run['label']}: extended to {run.get('context_length', '?')}, {read}"


def _gain_layout(results: dict[str, Any]) -> tuple[list[dict[str, Any]], list[int], int] | None:
    """The runs with far-context gains, every length any of them has, and the local window
    (None without context-use results)."""
    runs = [r for r in results["runs"] if r.get("context_use")]
    if not runs:
        return None
    lengths = sorted({int(n) for r in runs for n in r["context_use"]})
    return runs, lengths, next(iter(runs[0]["context_use"].values()))["window"]


def _retrieval_cells(accuracy: list[list[float]]) -> list[str]:
    """Per length: the mean accuracy over depths and, in brackets, the worst depth's."""
    return [f"{sum(row) / len(row):.0%} ({min(row):.0%})" for row in accuracy]


def _last_bucket_cells(run: dict[str, Any], lengths: list[int], cell: Any) -> list[str]:
    """``cell(bucket)`` of the last position bucket at each length ("-" where the length is
    not past the local window: nothing there is far)."""
    cells = []
    for n in lengths:
        res = run["context_use"].get(str(n))
        cells.append("-" if res is None or n <= res["window"] else cell(res["buckets"][-1]))
    return cells


def _gain_starred(last: dict[str, Any]) -> str:
    # * marks a gain whose 95% interval excludes 0 (the interval is in results.json).
    sure = last["ci_low"] > 0 or last["ci_high"] < 0
    return f"{last['gain_bits']:+.3f}{'*' if sure else ' '}"


def _gain_interval(last: dict[str, Any]) -> str:
    return f"{last['gain_bits']:+.3f} ({last['ci_low']:+.3f} to {last['ci_high']:+.3f})"


def context_use_table(results: dict[str, Any]):  # -> rich.table.Table | None
    """Far-context gain of the last position bucket (bits/token, 95% CI), per run x length."""
    from rich.table import Table

    layout = _gain_layout(results)
    if layout is None:
        return None
    runs, lengths, window = layout
    table = Table(
        title=f"far-context gain, last bucket (bits/token; local window {window})",
        caption="positive: the model uses text more than the window back; *: 95% interval "
        "excludes 0; eff.: effective context length",
    )
    table.add_column("model / method")
    for n in lengths:
        table.add_column(str(n), justify="right")
    table.add_column("eff.", justify="right")
    for run in runs:
        cells = _last_bucket_cells(run, lengths, _gain_starred)
        eff = run.get("effective_length")
        table.add_row(run["label"], *cells, str(eff) if eff else "none")
    return table


def _key_layout(
    results: dict[str, Any],
) -> tuple[list[dict[str, Any]], list[int], int, float] | None:
    """As :func:`_gain_layout`, plus the key-token threshold in nats; None unless the results
    have key-token figures (results.json files of older versions do not)."""
    layout = _gain_layout(results)
    if layout is None:
        return None
    runs, lengths, window = layout
    found = [res for r in runs for res in r["context_use"].values() if "key_fraction" in res]
    if not found:
        return None
    return runs, lengths, window, found[0]["protocol"].get("key_token_nats", 2.0)


def _key_cells(run: dict[str, Any], lengths: list[int]) -> list[str]:
    """Per length: the key tokens' perplexity and their share of the tokens ("-" where the
    length is not past the local window, "none" where no token is a key token)."""
    cells = []
    for n in lengths:
        res = run["context_use"].get(str(n))
        if res is None or n <= res["window"] or "key_fraction" not in res:
            cells.append("-")
        elif res["key_ppl"] is None:
            cells.append("none")
        else:
            cells.append(f"{_md_number(res['key_ppl'])} ({res['key_fraction']:.1%})")
    return cells


def key_token_table(results: dict[str, Any]):  # -> rich.table.Table | None
    """LongPPL-style perplexity on the key tokens (and their share), per run x length."""
    from rich.table import Table

    layout = _key_layout(results)
    if layout is None:
        return None
    runs, lengths, window, nats = layout
    table = Table(
        title=f"key tokens: perplexity (share of tokens); local window {window}",
        caption=f"key token: its NLL drops by > {nats:g} nats from the last {window} tokens to "
        "the full context (LongPPL-style, Fang et al. 2024); perplexity with the full context",
    )
    table.add_column("model / method")
    for n in lengths:
        table.add_column(str(n), justify="right")
    for run in runs:
        table.add_row(run["label"], *_key_cells(run, lengths))
    return table


def key_token_markdown(results: dict[str, Any]) -> list[str]:
    """The key-token table of report.md, with its protocol (no lines without figures)."""
    layout = _key_layout(results)
    if layout is None:
        return []
    runs, lengths, window, nats = layout
    return [
        "",
        f"Key tokens (LongPPL-style, Fang et al. 2024): the tokens whose loss drops by more than "
        f"{nats:g} nats when the model reads the full context instead of the last {window} "
        "tokens; their perplexity with the full context, and in brackets their share of all "
        "scored tokens.",
        "",
        *_md_head(lengths),
        *(f"| {run['label']} | " + " | ".join(_key_cells(run, lengths)) + " |" for run in runs),
    ]


def _templates_label(rt: dict[str, Any]) -> str:
    """``heldout templates: a, b, c`` (or the one template's name)."""
    names = rt.get("templates") or [rt["template"]]
    if names == [rt["template"]]:
        return f"{rt['template']} template"
    return f"{rt['template']} templates: {', '.join(names)}"


def retrieval_table(results: dict[str, Any]):  # -> rich.table.Table | None
    from rich.table import Table

    runs = [r for r in results["runs"] if "retrieval" in r]
    if not runs:
        return None
    lengths = runs[0]["retrieval"]["lengths"]
    table = Table(
        title=f"retrieval accuracy ({_templates_label(runs[0]['retrieval'])}; mean over depths, "
        "min depth)"
    )
    table.add_column("model / method")
    for n in lengths:
        table.add_column(str(n), justify="right")
    for run in runs:
        rt = run["retrieval"]
        table.add_row(run["label"], *_retrieval_cells(rt["accuracy"]))
    return table


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


# ---------------------------------------------------------------------------------------------
# Markdown (report.md of a recipe run, the model card)


def _md_number(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "inf"
    return f"{value:.2f}" if value < 1000 else f"{value:.3g}"


def _md_head(lengths: list[int]) -> list[str]:
    """The header and rule of a Markdown table with one row per variant, a column per length."""
    return [
        "| variant | " + " | ".join(str(n) for n in lengths) + " |",
        "|---|" + "---:|" * len(lengths),
    ]


def ppl_markdown(results: dict[str, Any]) -> str:
    """Perplexity table: one row per variant, one column per length (with 95% intervals)."""
    lengths = results["config"]["lengths"]
    head, rule = _md_head(lengths)
    rows = []
    for run in results["runs"]:
        cells = []
        for n in lengths:
            res = run["ppl"].get(str(n))
            cells.append(
                "-"
                if res is None
                else f"{_md_number(res['ppl'])} ({_md_number(res['ci_low'])}-{_md_number(res['ci_high'])})"
            )
        rows.append(f"| {run['label']} | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])


def passkey_markdown(results: dict[str, Any]) -> str | None:
    """Passkey accuracy table (mean over depths), or None without passkey results."""
    runs = [r for r in results["runs"] if "passkey" in r]
    if not runs:
        return None
    lengths = results["config"]["lengths"]
    head, rule = _md_head(lengths)
    rows = [
        f"| {r['label']} | "
        + " | ".join(f"{r['passkey']['mean_by_length'][str(n)]:.0%}" for n in lengths)
        + " |"
        for r in runs
    ]
    return "\n".join([head, rule, *rows])


def context_use_markdown(results: dict[str, Any]) -> str | None:
    """Context use for report.md and model cards: the effective context length of every variant,
    the far-context gain of the last position bucket, the key tokens' perplexity and the
    retrieval accuracy (None without context-use or retrieval results)."""
    # One list item per variant (consecutive plain lines would run into one paragraph).
    lines = [f"- {line}" for run in results["runs"] if (line := effective_length_line(run))]
    layout = _gain_layout(results)
    if layout is not None:
        gain_runs, lengths, window = layout
        rows = []
        for run in gain_runs:
            cells = _last_bucket_cells(run, lengths, _gain_interval)
            rows.append(f"| {run['label']} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"Far-context gain in the last position bucket (bits per token, 95% interval): the "
            f"loss with only the last {window} tokens minus the loss with the full context; "
            "positive means the model uses text more than that far back.",
            "",
            *_md_head(lengths),
            *rows,
            *key_token_markdown(results),
        ]
    rt_runs = [r for r in results["runs"] if "retrieval" in r]
    if rt_runs:
        rt0 = rt_runs[0]["retrieval"]
        lines += [
            "",
            f"Retrieval accuracy ({_templates_label(rt0)}, {rt0['trials']} trials per cell; "
            "mean over depths, worst depth in brackets):",
            "",
            *_md_head(rt0["lengths"]),
        ]
        for run in rt_runs:
            cells = _retrieval_cells(run["retrieval"]["accuracy"])
            lines.append(f"| {run['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines).strip("\n") or None


# ---------------------------------------------------------------------------------------------
# `ctxext tune`'s leaderboard (leaderboard.md and leaderboard.png)


def leaderboard_markdown(lines: list[dict[str, Any]], target: int, trained: int) -> str:
    """Ranked rows (``tune.leaderboard.ranked_rows``) as a Markdown table."""
    head = (
        f"| rank | configuration | ppl @ {trained} | ppl @ {target} (95% CI) | "
        f"vs paper YaRN @ {target} |\n|---:|---|---:|---:|---:|\n"
    )
    body = "".join(
        f"| {i} | {r['label']} | {r['ppl_trained']:.2f} | {r['ppl_target']:.2f} "
        f"({r['ci_target'][0]:.2f}-{r['ci_target'][1]:.2f}) | {r['vs_paper_yarn']:+.1%} |\n"
        for i, r in enumerate(lines, 1)
    )
    return head + body


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
