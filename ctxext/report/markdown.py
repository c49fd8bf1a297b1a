"""Markdown tables: report.md of a recipe run, the model card, tune's leaderboard.md."""

from __future__ import annotations

from typing import Any

from ctxext.report.cells import (
    effective_length_line,
    family_rows,
    gain_interval,
    gain_layout,
    key_cells,
    key_layout,
    last_bucket_cells,
    md_number,
    retrieval_cells,
    templates_label,
)


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
                else f"{md_number(res['ppl'])} ({md_number(res['ci_low'])}-{md_number(res['ci_high'])})"
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


def key_token_markdown(results: dict[str, Any]) -> list[str]:
    """The key-token table of report.md, with its protocol (no lines without figures)."""
    layout = key_layout(results)
    if layout is None:
        return []
    runs, lengths, rule = layout
    return [
        "",
        f"Key tokens (LongPPL, Fang et al. 2024; the model its own evaluator): a token is one "
        f"when {rule}; their perplexity with the full context (LongPPL), and in brackets their "
        "share of all scored tokens.",
        "",
        *_md_head(lengths),
        *(f"| {run['label']} | " + " | ".join(key_cells(run, lengths)) + " |" for run in runs),
    ]


def context_use_markdown(results: dict[str, Any]) -> str | None:
    """Context use for report.md and model cards: the effective context length of every variant,
    the far-context gain of the last position bucket, the key tokens' perplexity and the
    retrieval accuracy (None without context-use, longppl or retrieval results)."""
    # One list item per variant (consecutive plain lines would run into one paragraph).
    lines = [f"- {line}" for run in results["runs"] if (line := effective_length_line(run))]
    layout = gain_layout(results)
    if layout is not None:
        gain_runs, lengths, window = layout
        rows = []
        for run in gain_runs:
            cells = last_bucket_cells(run, lengths, gain_interval)
            rows.append(f"| {run['label']} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"Far-context gain in the last position bucket (bits per token, 95% interval): the "
            f"loss with only the last {window} tokens minus the loss with the full context; "
            "positive means the model uses text more than that far back.",
            "",
            *_md_head(lengths),
            *rows,
        ]
    lines += key_token_markdown(results)
    rt_runs = [r for r in results["runs"] if "retrieval" in r]
    if rt_runs:
        rt0 = rt_runs[0]["retrieval"]
        lines += [
            "",
            f"Retrieval accuracy ({templates_label(rt0)}, {rt0['trials']} trials per cell; "
            "mean over depths, worst depth in brackets):",
            "",
            *_md_head(rt0["lengths"]),
        ]
        for run in rt_runs:
            cells = retrieval_cells(run["retrieval"]["accuracy"])
            lines.append(f"| {run['label']} | " + " | ".join(cells) + " |")
        lines += effective_markdown(results)
    return "\n".join(lines).strip("\n") or None


def effective_markdown(results: dict[str, Any]) -> list[str]:
    """Per run, the effective-length decision per retrieval family and length (no lines
    without effective-length details)."""
    runs = [(r, rows) for r in results["runs"] if (rows := family_rows(r, verbose=True))]
    if not runs:
        return []
    protocol = results.get("protocol", {}).get("effective_length", "")
    lines = ["", f"Effective context length, per retrieval family: {protocol}."]
    for run, rows in runs:
        detail = run["effective_length_detail"]
        lengths = list(detail["lengths"])
        ref = detail["reference"] or {}
        lines += [
            "",
            f"{run['label']}: reference {ref.get('source', 'none')}; accuracy pooled over each "
            "family's forms and depths (hits/n, Wilson 95% interval), ok/FAIL against its "
            "threshold:",
            "",
            "| family | reference | threshold | " + " | ".join(lengths) + " |",
            "|---|---:|---:|" + "---:|" * len(lengths),
            *(
                f"| {family} | {r} | {t} | " + " | ".join(cells) + " |"
                for family, r, t, cells in rows
            ),
            "",
            "Decision per length: "
            + "; ".join(f"{n}: {e['decision']}" for n, e in detail["lengths"].items())
            + ".",
        ]
    return lines


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
