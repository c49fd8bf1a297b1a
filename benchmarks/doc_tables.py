"""The figure tables of README.md and docs/*.md, generated from the shipped results files.

    python benchmarks/doc_tables.py            # rewrite every table block in place
    python benchmarks/doc_tables.py --check    # exit 1 if a block differs from its file

A table block in a Markdown file is::

    <!-- table: KIND path/to/results.json [more/results.json ...] -->
    | ... generated ... |
    <!-- /table -->

and its text is exactly what ``KIND`` makes of the named results files (paths from the
repository root). tests/test_docs_figures.py runs the check, so a figure in the docs cannot
drift from the file it claims to come from: regenerate the file, then run this script.

Kinds: ``ppl`` (perplexity per length and bits per byte at the longest), ``buckets``
(perplexity per position bucket at the longest length), ``context-use`` (far-context gain per
bucket with its 95% interval, retrieval per held-out family and length, effective length),
``families`` (retrieval per held-out family, per length) and ``run`` (a `ctxext run`'s
headline: perplexity, last-bucket gain, retrieval per family at the shortest and longest
length, effective length).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ctxext.evaluate.needles import families_of

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"<!-- table: (?P<spec>[^>]*?) -->\n(?P<body>.*?)<!-- /table -->", re.S)


def _k(n: int | str) -> str:
    n = int(n)
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _runs(paths: list[str]) -> list[dict[str, Any]]:
    runs = []
    for p in paths:
        runs += json.loads((ROOT / p).read_text())["runs"]
    return runs


def _label(run: dict[str, Any]) -> str:
    return run["label"]


def family_accuracy(retrieval: dict[str, Any]) -> dict[str, list[float]]:
    """Accuracy per held-out family per length (pooled over the family's forms and depths)."""
    by = retrieval["by_template"]
    out = {}
    for fam, names in families_of(list(by)).items():
        out[fam] = [
            sum(sum(by[n][i]) / len(by[n][i]) for n in names) / len(names)
            for i in range(len(retrieval["lengths"]))
        ]
    return out


def _pct(x: float) -> str:
    return f"{x:.0%}"


def _eff(run: dict[str, Any]) -> str:
    e = run.get("effective_length")
    return "none" if e is None else str(e)


def ppl_table(paths: list[str]) -> str:
    runs = _runs(paths)
    lengths = list(runs[0]["ppl"])
    top = lengths[-1]
    head = ["model / method", *lengths, f"bits/byte @{top}"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for r in runs:
        cells = [f"{r['ppl'][n]['ppl']:.2f}" for n in lengths]
        cells.append(f"{r['ppl'][top]['bits_per_byte']:.3f}")
        lines.append(f"| {_label(r)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def buckets_table(paths: list[str]) -> str:
    runs = _runs(paths)
    top = list(runs[0]["ppl"])[-1]
    buckets = runs[0]["ppl"][top]["buckets"]
    head = ["bucket", *(f"{_k(b['start'])}-{_k(b['end'])}" for b in buckets)]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for r in runs:
        cells = [f"{b['ppl']:.1f}" for b in r["ppl"][top]["buckets"]]
        lines.append(f"| {_label(r)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _gain(b: dict[str, Any]) -> str:
    return f"{b['gain_bits']:+.3f} [{b['ci_low']:+.3f}, {b['ci_high']:+.3f}]"


def _families_cell(r: dict[str, Any], fam: str) -> str:
    return " / ".join(_pct(a) for a in family_accuracy(r["retrieval"]).get(fam, []))


def context_use_table(paths: list[str]) -> str:
    runs = _runs(paths)
    top = list(runs[0]["context_use"])[-1]
    far = [b for b in runs[0]["context_use"][top]["buckets"] if b["start"] > 0]
    fams = list(family_accuracy(runs[0]["retrieval"]))
    head = [
        "model / method",
        *(f"gain {_k(b['start'])}-{_k(b['end'])}" for b in far),
        *(f"{f} {' / '.join(_k(n) for n in runs[0]['retrieval']['lengths'])}" for f in fams),
        "effective length",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * len(far) + "|---" * len(fams)]
    lines[-1] += "|---:|"
    for r in runs:
        gains = [_gain(b) for b in r["context_use"][top]["buckets"] if b["start"] > 0]
        fam_cells = [_families_cell(r, f) for f in fams]
        lines.append(f"| {_label(r)} | " + " | ".join([*gains, *fam_cells, _eff(r)]) + " |")
    return "\n".join(lines)


def families_table(paths: list[str]) -> str:
    runs = _runs(paths)
    lengths = runs[0]["retrieval"]["lengths"]
    fams = list(family_accuracy(runs[0]["retrieval"]))
    head = ["model / method", *(f"{f} ({' / '.join(_k(n) for n in lengths)})" for f in fams)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in runs:
        lines.append(f"| {_label(r)} | " + " | ".join(_families_cell(r, f) for f in fams) + " |")
    return "\n".join(lines)


def run_table(paths: list[str]) -> str:
    runs = _runs(paths)
    lengths = list(runs[0]["ppl"])
    rl = runs[0]["retrieval"]["lengths"]
    fams = list(family_accuracy(runs[0]["retrieval"]))
    top = list(runs[0]["context_use"])[-1]
    last = runs[0]["context_use"][top]["buckets"][-1]
    head = [
        "model",
        *(f"ppl {_k(n)}" for n in lengths),
        f"gain {_k(last['start'])}-{_k(last['end'])} @{_k(top)}",
        *(f"{f} {_k(rl[0])} / {_k(rl[-1])}" for f in fams),
        "effective length",
    ]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for r in runs:
        acc = family_accuracy(r["retrieval"])
        cells = [f"{r['ppl'][n]['ppl']:.2f}" for n in lengths]
        cells.append(_gain(r["context_use"][top]["buckets"][-1]))
        cells += [f"{_pct(acc[f][0])} / {_pct(acc[f][-1])}" for f in fams]
        cells.append(_eff(r))
        lines.append(f"| {_label(r)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _overrides(path: str) -> str:
    """The recipe overrides a run was made with, less the evaluation's and the output's."""
    recipe = json.loads((ROOT / path).read_text())["provenance"]["recipe"]
    kept = [
        o
        for o in recipe.get("overrides", [])
        if not o.startswith(("eval.", "--output-dir", "--work"))
    ]
    what = " ".join(f"`{o}`" for o in kept) or "none"
    return f"{recipe['name']}: {what}"


def variants_table(paths: list[str]) -> str:
    """One row per results file: its recipe overrides and the last run's retrieval per
    held-out family at the first / last length."""
    first = _runs(paths[:1])[-1]["retrieval"]
    rl, fams = first["lengths"], list(family_accuracy(first))
    head = ["recipe overrides", *(f"{f} {_k(rl[0])} / {_k(rl[-1])}" for f in fams)]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * len(fams) + "|"]
    for path in paths:
        acc = family_accuracy(_runs([path])[-1]["retrieval"])
        cells = [f"{_pct(acc[f][0])} / {_pct(acc[f][-1])}" for f in fams]
        lines.append(f"| {_overrides(path)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


KINDS: dict[str, Callable[[list[str]], str]] = {
    "ppl": ppl_table,
    "buckets": buckets_table,
    "context-use": context_use_table,
    "families": families_table,
    "run": run_table,
    "variants": variants_table,
}


def render(spec: str) -> str:
    kind, *paths = spec.split()
    if kind not in KINDS or not paths:
        raise SystemExit(f"bad table block {spec!r}: KIND ({', '.join(KINDS)}) and results files")
    return KINDS[kind](paths) + "\n"


def blocks(text: str) -> list[tuple[str, str]]:
    """(spec, body) of every table block in ``text``."""
    return [(m["spec"], m["body"]) for m in BLOCK.finditer(text)]


def rewrite(text: str) -> str:
    return BLOCK.sub(
        lambda m: f"<!-- table: {m['spec']} -->\n{render(m['spec'])}<!-- /table -->", text
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report blocks that differ")
    args = ap.parse_args()
    stale = []
    for doc in DOCS:
        text = doc.read_text()
        new = rewrite(text)
        if new != text:
            stale.append(doc.relative_to(ROOT))
            if not args.check:
                doc.write_text(new)
    verb = "differ from their results files" if args.check else "rewritten"
    print(f"{len(stale)} file(s) {verb}: {', '.join(map(str, stale)) or '-'}")
    sys.exit(1 if args.check and stale else 0)


if __name__ == "__main__":
    main()
