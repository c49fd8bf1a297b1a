"""What every rendering of a results document shares: the metric (perplexity or bits per
byte), the curves, the effective-length line and the cells of the context-use and retrieval
tables."""

from __future__ import annotations

import math
from typing import Any


def metric(results: dict[str, Any]) -> str:
    """'ppl', or 'bpb' (bits per byte) when the rows' tokenizers split the data differently.

    Perplexity is per token, so it compares only rows that score the same tokens; bits per
    byte is per byte of text and compares across tokenizers.
    """
    prints = {r.get("tokens_fingerprint") for r in results["runs"] if r.get("ppl")}
    return "bpb" if len(prints) > 1 else "ppl"


def metric_value(res: dict[str, Any], which: str) -> float | None:
    return res.get("bits_per_byte") if which == "bpb" else res.get("ppl")


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
            if (v := metric_value(r, which)) is not None and math.isfinite(v)
        )
        if pts:
            out.append((run["label"], [p[0] for p in pts], [p[1] for p in pts]))
    return out


METRIC_LABELS = {"ppl": "perplexity", "bpb": "bits per byte"}


def effective_reach(run: dict[str, Any]) -> str:
    """ "reads to 1024" (or "reads to none of the lengths", or "not judged" where neither
    retrieval nor the far-context gain could judge a length) for a run with an effective length."""
    reach = run["effective_length"]
    detail = run.get("effective_length_detail")
    if detail is not None and not detail.get("basis"):
        return "not judged"
    return f"reads to {reach}" if reach else "reads to none of the lengths"


def effective_length_line(run: dict[str, Any]) -> str | None:
    """ "extended to 2048, reads to 1024" (or "reads to none of the lengths"), then the rule's
    inputs (:func:`effective_basis`) where the results carry them."""
    if "effective_length" not in run:
        return None
    line = f"{run['label']}: extended to {run.get('context_length', '?')}, {effective_reach(run)}"
    basis = effective_basis(run)
    return line if basis is None else f"{line} ({basis})"


def _share(t: dict[str, Any]) -> str:
    return f"{t['accuracy']:.0%} ({t['hits']}/{t['n']})"


def percent(x: float) -> str:
    """A threshold or floor, unrounded to 3 digits (0.855 is 85.5%, not 86%)."""
    return f"{x * 100:.3g}%"


def effective_basis(run: dict[str, Any]) -> str | None:
    """The floor, each family's reference and threshold (or why it is not judged), the length
    that stopped it and where one key decides; None without ``effective_length_detail``."""
    detail = run.get("effective_length_detail")
    if detail is None:
        return None
    parts = [f"floor {percent(detail['floor'])}"]
    ref = detail.get("reference")
    fams = []
    for name, fam in detail["families"].items():
        r = fam["reference"]
        if r is None:
            fams.append(f"{name} no reference")
            continue
        verdict = f"threshold {percent(fam['threshold'])}" if fam["counted"] else "not judged"
        fams.append(f"{name} {_share(r)} -> {verdict}{_one_key(fam)}")
    measured = [f for f in detail["families"].values() if f["reference"] is not None]
    if ref is not None and measured:
        parts.append(f"reference {ref['model']} unscaled @{ref['length']}: " + ", ".join(fams))
    elif ref is not None:
        parts.append(f"reference {ref['model']} {ref['source']}")
    if not detail["retrieval_judged"]:
        why = "no family reaches the floor" if measured else "no reference" if fams else "not run"
        rest = "the far-context gain alone decides" if detail["basis"] else "nothing else measured"
        parts.append(f"retrieval not judged ({why}): {rest}")
    stop = next((n for n, e in detail["lengths"].items() if not e["passes"]), None)
    if stop is not None and detail["basis"]:
        parts.append(f"stops at {stop}: {detail['lengths'][stop]['decision']}")
    close = [n for n, e in detail["lengths"].items() if e.get("one_key_decides")]
    if close:
        parts.append(f"one key decides at {', '.join(close)}")
    return "; ".join(parts)


def _one_key(decision: dict[str, Any]) -> str:
    return " (one key decides)" if decision.get("one_key_decides") else ""


def family_rows(
    run: dict[str, Any], verbose: bool = False
) -> list[tuple[str, str, str, list[str]]] | None:
    """Per retrieval family: its name, reference, threshold ("not judged" below the floor) and
    a cell per length: accuracy pooled over its forms and depths with hits/n, and against a
    threshold "ok" or "FAIL". ``verbose`` (Markdown): the Wilson 95% interval too and "(one key
    decides)"; else (the terminal) "!" marks a verdict one key flips. None without
    ``effective_length_detail``."""
    detail = run.get("effective_length_detail")
    if detail is None or not detail["families"]:
        return None

    def share(t: dict[str, Any], verdict: str = "", one: bool = False) -> str:
        if not verbose:
            return f"{t['accuracy']:.0%} {t['hits']}/{t['n']}{verdict}{'!' if one else ''}"
        ci = f", {t['ci_low']:.0%}-{t['ci_high']:.0%}" if "ci_low" in t else ""
        text = f"{t['accuracy']:.0%} ({t['hits']}/{t['n']}{ci}){verdict}"
        return text + (" (one key decides)" if one else "")

    rows = []
    for name, fam in detail["families"].items():
        r = fam["reference"]
        threshold = percent(fam["threshold"]) if fam["counted"] else "not judged"
        cells = []
        for entry in detail["lengths"].values():
            t = entry.get("families", {}).get(name)
            if t is None:
                cells.append("-")
            elif "passes" in t:
                cells.append(share(t, " ok" if t["passes"] else " FAIL", t["one_key_decides"]))
            else:
                cells.append(share(t))
        ref = "-" if r is None else share(r, "", fam["one_key_decides"])
        rows.append((name, ref, threshold, cells))
    return rows


def sliding_window_lines(results: dict[str, Any]) -> list[str]:
    """One line per model whose sliding window is shorter than the longest evaluated length:
    its sliding layers never see past the window, whatever the rope scaling."""
    longest = max(results["config"]["lengths"])  # the length each run's note is written at
    lines: dict[str, str] = {}
    for run in results["runs"]:
        window = run.get("sliding_window")
        if window and "note" in window and window["window"] < longest:
            lines.setdefault(run["model"], f"{run['model']}: {window['note']}")
    return list(lines.values())


def gain_layout(results: dict[str, Any]) -> tuple[list[dict[str, Any]], list[int], int] | None:
    """The runs with far-context gains, every length any of them has, and the local window
    (None without context-use results)."""
    runs = [r for r in results["runs"] if r.get("context_use")]
    if not runs:
        return None
    lengths = sorted({int(n) for r in runs for n in r["context_use"]})
    return runs, lengths, next(iter(runs[0]["context_use"].values()))["window"]


def retrieval_cells(accuracy: list[list[float]]) -> list[str]:
    """Per length: the mean accuracy over depths and, in brackets, the worst depth's."""
    return [f"{sum(row) / len(row):.0%} ({min(row):.0%})" for row in accuracy]


def last_bucket_cells(run: dict[str, Any], lengths: list[int], cell: Any) -> list[str]:
    """``cell(bucket)`` of the last position bucket at each length ("-" where the length is
    not past the local window: nothing there is far)."""
    cells = []
    for n in lengths:
        res = run["context_use"].get(str(n))
        cells.append("-" if res is None or n <= res["window"] else cell(res["buckets"][-1]))
    return cells


def gain_starred(last: dict[str, Any]) -> str:
    # * marks a gain whose 95% interval excludes 0 (the interval is in results.json).
    sure = last["ci_low"] > 0 or last["ci_high"] < 0
    return f"{last['gain_bits']:+.3f}{'*' if sure else ' '}"


def gain_interval(last: dict[str, Any]) -> str:
    return f"{last['gain_bits']:+.3f} ({last['ci_low']:+.3f} to {last['ci_high']:+.3f})"


def key_results(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A run's key-token figures by length: its ``longppl`` task, or (results.json files of
    earlier versions) the key-token fields its context-use results carried."""
    if run.get("longppl"):
        return run["longppl"]
    uses = run.get("context_use") or {}
    return {n: res for n, res in uses.items() if "key_fraction" in res}


def key_rule(res: dict[str, Any]) -> str:
    """What made a key token in ``res`` (one length's figures), in words: the short context
    (its window and stride) and both thresholds, from the protocol it carries."""
    protocol = res.get("protocol") or {}
    window, stride = res["window"], res.get("stride")
    nats = protocol.get("key_token_nats", 2.0)
    if protocol.get("name") == "longppl":
        short = (
            f"the short context (chunks of {window + stride} positions every {stride}: the "
            f"last {window} to {window + stride - 1} positions)"
        )
    else:  # an earlier version's context-use: its local windows
        short = f"a local window of {window} positions"
        short += f" (windows stepping back by {stride})" if stride else ""
    rule = f"its NLL drops by more than {nats:g} nats from {short} to the full context"
    if protocol.get("key_token_max_nll") is None:
        return f"{rule}, with no condition on the full-context NLL (an earlier ctxext)"
    return f"{rule} and its full-context NLL is below {protocol['key_token_max_nll']:g} nats"


def key_layout(results: dict[str, Any]) -> tuple[list[dict[str, Any]], list[int], str] | None:
    """The runs with key-token figures, every length any of them has, and what made a key
    token (each distinct rule once); None without key-token figures."""
    runs = [r for r in results["runs"] if key_results(r)]
    if not runs:
        return None
    lengths = sorted({int(n) for r in runs for n in key_results(r)})
    rules = dict.fromkeys(key_rule(res) for r in runs for res in key_results(r).values())
    return runs, lengths, "; or ".join(rules)


def key_cells(run: dict[str, Any], lengths: list[int]) -> list[str]:
    """Per length: the key tokens' perplexity and their share of the tokens ("-" where the
    length has no cut token, "none" where no token is a key token)."""
    cells = []
    found = key_results(run)
    for n in lengths:
        res = found.get(str(n))
        if res is None or n <= res["window"]:
            cells.append("-")
        elif res["key_ppl"] is None:
            cells.append("none")
        else:
            cells.append(f"{md_number(res['key_ppl'])} ({res['key_fraction']:.1%})")
    return cells


def templates_label(rt: dict[str, Any]) -> str:
    """``heldout templates: a, b, c`` (or the one template's name)."""
    names = rt.get("templates") or [rt["template"]]
    if names == [rt["template"]]:
        return f"{rt['template']} template"
    return f"{rt['template']} templates: {', '.join(names)}"


def md_number(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "inf"
    return f"{value:.2f}" if value < 1000 else f"{value:.3g}"
