"""Rich tables of ``ctxext eval`` results for the terminal."""

from __future__ import annotations

import math
from typing import Any

from ctxext.report.cells import (
    family_rows,
    gain_layout,
    gain_starred,
    key_cells,
    key_layout,
    last_bucket_cells,
    metric,
    metric_value,
    percent,
    retrieval_cells,
    templates_label,
)


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
            cells.append("-" if res is None else _fmt(metric_value(res, which), which))
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


def context_use_table(results: dict[str, Any]):  # -> rich.table.Table | None
    """Far-context gain of the last position bucket (bits/token, 95% CI), per run x length."""
    from rich.table import Table

    layout = gain_layout(results)
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
        cells = last_bucket_cells(run, lengths, gain_starred)
        eff = run.get("effective_length")
        table.add_row(run["label"], *cells, str(eff) if eff else "none")
    return table


def key_token_table(results: dict[str, Any]):  # -> rich.table.Table | None
    """LongPPL-style perplexity on the key tokens (and their share), per run x length."""
    from rich.table import Table

    layout = key_layout(results)
    if layout is None:
        return None
    runs, lengths, rule = layout
    table = Table(
        title="key tokens (LongPPL): perplexity (share of tokens)",
        caption=f"key token: {rule} (LongPPL, Fang et al. 2024); perplexity with the full context",
    )
    table.add_column("model / method")
    for n in lengths:
        table.add_column(str(n), justify="right")
    for run in runs:
        table.add_row(run["label"], *key_cells(run, lengths))
    return table


def retrieval_table(results: dict[str, Any]):  # -> rich.table.Table | None
    from rich.table import Table

    runs = [r for r in results["runs"] if "retrieval" in r]
    if not runs:
        return None
    lengths = runs[0]["retrieval"]["lengths"]
    table = Table(
        title=f"retrieval accuracy ({templates_label(runs[0]['retrieval'])}; mean over depths, "
        "min depth)"
    )
    table.add_column("model / method")
    for n in lengths:
        table.add_column(str(n), justify="right")
    for run in runs:
        rt = run["retrieval"]
        table.add_row(run["label"], *retrieval_cells(rt["accuracy"]))
    return table


def effective_table(results: dict[str, Any]):  # -> rich.table.Table | None
    """Per run and retrieval family: the unscaled reference, the threshold and the accuracy at
    each length against it (None without effective-length details)."""
    from rich.table import Table

    runs = [(r, rows) for r in results["runs"] if (rows := family_rows(r))]
    if not runs:
        return None
    detail = runs[0][0]["effective_length_detail"]
    lengths = list(detail["lengths"])
    table = Table(
        title="effective length: retrieval per family (pooled over forms and depths; hits/n)",
        caption=f"ref.: the unscaled model at its trained length; a family is judged iff ref. "
        f">= the floor {percent(detail['floor'])}, against t = max(floor, "
        f"{detail['relative']:g} x ref.); ok/FAIL: against t; !: one key more or less flips it",
    )
    for name in ("model / method", "family", "ref.", "t", *lengths):
        table.add_column(name, justify="left" if name in ("model / method", "family") else "right")
    for run, rows in runs:
        for i, (family, ref, threshold, cells) in enumerate(rows):
            table.add_row(run["label"] if i == 0 else "", family, ref, threshold, *cells)
    return table
