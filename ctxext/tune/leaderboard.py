"""The leaderboard: the unscaled model, every paper default and every tuned best, measured on the
report documents (unseen by the search) and ranked; and the recipe that reproduces the winner."""

from __future__ import annotations

from typing import Any

from ctxext.config import ExtendConfig
from ctxext.tune.search import DEFAULT_ROWS, Candidate, Scorer, Trial


def leaderboard_candidates(best: dict[str, Trial]) -> list[tuple[str, Candidate | None]]:
    """Rows: the unscaled model, every method's paper default, every tuned best."""
    rows: list[tuple[str, Candidate | None]] = [("base (unscaled)", None)]
    rows += [(f"{m} (paper default)", Candidate(m)) for m in DEFAULT_ROWS]
    rows += [(f"{m} (tuned)", t.candidate) for m, t in best.items()]
    return rows


def evaluate_rows(
    scorer: Scorer, rows: list[tuple[str, Candidate | None]], lengths: list[int]
) -> list[dict[str, Any]]:
    """Each row on all of the scorer's documents at every length (the same documents)."""
    from ctxext.evaluate.perplexity import evaluate_perplexity

    runs = []
    for label, cand in rows:
        scorer.apply(cand)
        ppl = {}
        for n in lengths:
            res = evaluate_perplexity(scorer.model, scorer.docs, n, bos_token_id=scorer.bos)
            ppl[str(n)] = res.to_dict()
        spec = None if cand is None else cand.spec(scorer.target_length).model_dump()
        runs.append({"label": label, "method": cand and cand.method, "extend": spec, "ppl": ppl})
    return runs


def ranked_rows(runs: list[dict[str, Any]], target: int, trained: int) -> list[dict[str, Any]]:
    """Leaderboard lines sorted by perplexity at the target, with the change vs paper YaRN."""
    yarn = next(r for r in runs if r["label"] == "yarn (paper default)")
    ref = yarn["ppl"][str(target)]["ppl"]
    lines = []
    for run in runs:
        at_n, at_l = run["ppl"][str(target)], run["ppl"][str(trained)]
        lines.append(
            {
                "label": run["label"],
                "ppl_trained": at_l["ppl"],
                "ppl_target": at_n["ppl"],
                "ci_target": [at_n["ci_low"], at_n["ci_high"]],
                "vs_paper_yarn": at_n["ppl"] / ref - 1.0,
            }
        )
    return sorted(lines, key=lambda r: r["ppl_target"])


def recipe_snippet(result: dict[str, Any]) -> str:
    """A recipe (`ctxext run`) whose extend: block reproduces the chosen configuration."""
    import yaml

    spec = {k: v for k, v in result["chosen"]["extend"].items() if v is not None}
    defaults = ExtendConfig.model_fields
    spec = {k: v for k, v in spec.items() if k == "method" or v != defaults[k].default}
    best = result["leaderboard"][0]
    lines = [
        f"# written by ctxext tune (seed {result['config']['seed']}): the best configuration",
        f"# found for {result['model']['name']} at {result['config']['target_length']} tokens",
        f"# (report-document ppl {best['ppl_target']:.2f}; see tune.json for the protocol).",
    ]
    body = {"model": result["model"]["name"], "extend": spec}
    text = yaml.safe_dump(body, sort_keys=False, default_flow_style=None, width=100)
    return "\n".join(lines) + "\n" + text
