"""The output folder of ``ctxext eval``: results.json (strict JSON), results.csv and the plots."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from ctxext.report.cells import series
from ctxext.report.plots import plot_context_use, plot_passkey, plot_ppl, plot_retrieval


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
        for n, k in (run.get("longppl") or {}).items():
            w.writerow(
                [run["label"], run["model"], run["method"] or "base", "longppl", n, "",
                 k["key_ppl"], "", "", k["key_tokens"], k["n_docs"]]
            )  # fmt: skip
    return buf.getvalue()
