"""The closing summary of `ctxext run`: per variant, what the README calls the headline (the
far-context gain at the longest length, retrieval per length, the effective context length),
as plain text of at most 80 columns."""

from __future__ import annotations

import textwrap
from typing import Any

from ctxext.report.cells import effective_basis, effective_reach, gain_interval, percent

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
            basis = effective_basis(run)
            if basis is not None:
                lines += textwrap.wrap(
                    basis, WIDTH, initial_indent="    ", subsequent_indent="    "
                )
    rule = (results.get("protocol") or {}).get("effective_length")
    if rule is not None:
        lines += ["", *textwrap.wrap(f"effective context length: {rule}", WIDTH)]
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
    """Retrieval per family (pooled over its forms and depths, n keys per cell), against its
    threshold; pooled over every template where the results have no effective-length detail."""
    rt = run.get("retrieval")
    if rt is None:
        return []
    lengths = rt["lengths"]
    cell = max(6, *(len(str(n)) + 1 for n in lengths))
    detail = run.get("effective_length_detail")
    if detail is None or not detail["families"]:
        rows = [("all (pooled)", "", [f"{sum(r) / len(r):.0%}" for r in rt["accuracy"]])]
        what = "mean over depths"
    else:
        rows = []
        for family, fam in detail["families"].items():
            cells = [detail["lengths"][str(n)]["families"][family] for n in lengths]
            mark = f"t {percent(fam['threshold'])}" if fam["counted"] else "not judged"
            n = "/".join(sorted({str(c["n"]) for c in cells}))
            rows.append((f"{family} n={n}", mark, [_flagged(c) for c in cells]))
        what = "per family, pooled over forms and depths"
    name_width = max(14, *(len(name) + 1 for name, _, _ in rows))
    head = "    " + " " * name_width + "".join(f"{n:>{cell}}" for n in lengths)
    lines = [*textwrap.wrap(f"  retrieval ({rt['template']}; {what}):", WIDTH), head]
    for name, mark, cells in rows:
        text = f"    {name:<{name_width}}" + "".join(f"{c:>{cell}}" for c in cells)
        lines.append(f"{text}  {mark}".rstrip())
    if detail is not None and detail["families"]:
        lines.append("    (n: keys per cell; t: threshold; x: below it; !: one key flips it)")
    return lines


def _flagged(c: dict[str, Any]) -> str:
    """A judged cell's accuracy, "x" where it fails its threshold, "!" where one key decides."""
    fail = "x" if c.get("passes") is False else ""
    return f"{c['accuracy']:.0%}{fail}{'!' if c.get('one_key_decides') else ''}"
