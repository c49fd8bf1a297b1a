"""The closing summary of `ctxext run`: per variant, what the README calls the headline (the
far-context gain at the longest length, retrieval per length, the effective context length),
as plain text of at most 80 columns."""

from __future__ import annotations

import textwrap
from typing import Any

from ctxext.report.cells import effective_reach, gain_interval

WIDTH = 80


def headline_summary(results: dict[str, Any]) -> str | None:
    """Plain text, no line over 80 columns; None without context-use or retrieval results."""
    runs = [r for r in results["runs"] if r.get("context_use") or "retrieval" in r]
    if not runs:
        return None
    lines = ["what to look at (every table and interval: report.md)"]
    for run in runs:
        lines += ["", _fit(run["label"])]
        lines += _gain_lines(run)
        lines += _retrieval_lines(run)
        if "effective_length" in run:
            claimed = run.get("context_length")
            extended = f" (extended to {claimed})" if claimed else ""
            lines.append(f"  effective context length: {effective_reach(run)}{extended}")
    from ctxext.evaluate.effective_length import EFFECTIVE_LENGTH_RULE

    rule = f"effective context length: {EFFECTIVE_LENGTH_RULE}"
    lines += ["", *textwrap.wrap(rule, WIDTH)]
    return "\n".join(lines)


def _fit(text: str, indent: str = "") -> str:
    """One line, cut at 80 columns only if it must be (a label is one word a reader scans)."""
    return "\n".join(textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent))


def _gain_lines(run: dict[str, Any]) -> list[str]:
    uses = run.get("context_use") or {}
    if not uses:
        return []
    longest = max(uses, key=int)
    res = uses[longest]
    far = [b for b in res["buckets"] if b["end"] > res["window"]]  # tokens past the window
    if not far:
        return [f"  far-context gain @{longest}: none (not past the local window {res['window']})"]
    lines = [
        f"  far-context gain @{longest} (bits/token, 95% interval; > 0: reads past "
        f"{res['window']}):"
    ]
    for bucket in far:
        span = f"{_k(bucket['start'])}-{_k(bucket['end'])}"
        lines.append(f"    {span:<12}{gain_interval(bucket)}")
    return lines


def _k(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _retrieval_lines(run: dict[str, Any]) -> list[str]:
    rt = run.get("retrieval")
    if rt is None:
        return []
    lengths = rt["lengths"]
    cell = max(6, *(len(str(n)) + 1 for n in lengths))
    rows = [("all (pooled)", rt["accuracy"])]
    by_template = rt.get("by_template") or {}
    if len(by_template) > 1:
        rows += list(by_template.items())
    name_width = max(14, *(len(name) + 1 for name, _ in rows))
    head = "    " + " " * name_width + "".join(f"{n:>{cell}}" for n in lengths)
    lines = [f"  retrieval ({rt['template']}; mean over depths):", head]
    for name, acc in rows:
        means = "".join(f"{sum(row) / len(row):>{cell}.0%}" for row in acc)
        lines.append(f"    {name:<{name_width}}{means}")
    return lines
