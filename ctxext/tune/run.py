"""The `ctxext tune` pipeline: every cheap check first, the seeded search / report split, the
search, the leaderboard, and the output folder (checkpoint, tune.json, recipe, leaderboard)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctxext import checkpoint, locate, outputs, rope
from ctxext.config import ExtendConfig, TuneConfig
from ctxext.errors import CtxextError
from ctxext.tune.leaderboard import (
    evaluate_rows,
    leaderboard_candidates,
    ranked_rows,
    recipe_snippet,
)
from ctxext.tune.search import (
    SEARCHABLE,
    Progress,
    RopeNow,
    Scorer,
    Search,
    Trial,
    allocate_budget,
    run_search,
)


@dataclass
class Prepared:
    """What the cheap checks found, before anything slow runs."""

    source: locate.ResolvedModel
    config: dict[str, Any]
    info: rope.RopeInfo
    output: Path


def prepare(cfg: TuneConfig, output: Path, overwrite: bool) -> Prepared:
    """Every cheap check: model, RoPE, target length, methods, lengths, output path."""
    unknown = [m for m in cfg.methods if m not in SEARCHABLE]
    if unknown or not cfg.methods:
        raise CtxextError(
            f"--methods: unknown method {unknown[0] if unknown else '(none)'!r}; choose from "
            f"{','.join(SEARCHABLE)}"
        )
    if cfg.search_docs < 1 or cfg.report_docs < 1 or not 0 <= cfg.guard < 10:
        raise CtxextError("--search-docs and --report-docs must be >= 1 and --guard in [0, 10)")
    source = locate.resolve_model(cfg.model)
    config = checkpoint.read_config(source.path)
    info = rope.analyze(config)
    rope.validate_request(info, "yarn", None, cfg.target_length)
    bad = [n for n in cfg.report_lengths or [] if not 2 <= n <= cfg.target_length]
    if bad:
        raise CtxextError(
            f"--report-lengths {bad[0]} is outside [2, target length {cfg.target_length}]"
        )
    out = outputs.check_output_path(output, [source.path], overwrite)
    return Prepared(source, config, info, out)


def split_documents(
    ids: list[list[int]], cfg: TuneConfig, bos: int | None
) -> tuple[list[int], list[int]]:
    """Seeded, disjoint search and report sets among documents long enough for the target."""
    prefix = 0 if bos is None else 1
    eligible = [i for i, t in enumerate(ids) if len(t) + prefix >= cfg.target_length]
    need = cfg.search_docs + cfg.report_docs
    if len(eligible) < need:
        raise CtxextError(
            f"only {len(eligible)} documents have at least {cfg.target_length} tokens, and "
            f"--search-docs {cfg.search_docs} + --report-docs {cfg.report_docs} = {need} are "
            "needed: lower them, lower --target-length, or pass longer --data"
        )
    order = np.random.default_rng(cfg.seed).permutation(eligible).tolist()
    return order[: cfg.search_docs], order[cfg.search_docs : need]


def _calibrate(scorer: Scorer, trained: int) -> tuple[float, float]:
    """Seconds of one forward at N and at L (the unscaled model on the first search doc)."""
    scorer.nll(None, 0, trained)  # warm-up; also the guard reference
    started = time.perf_counter()
    scorer._memo.pop(("base", 0, trained))
    scorer.nll(None, 0, trained)
    t_trained = time.perf_counter() - started
    started = time.perf_counter()
    scorer.nll(None, 0, scorer.target_length)
    t_target = time.perf_counter() - started
    scorer.spent = 0.0
    return t_target, t_trained


@dataclass
class _Inputs:
    """The documents, their token ids and the search / report split."""

    docs: list[Any]
    ids: list[list[int]]
    bos: int | None
    search: list[int]
    report: list[int]


def _inputs(cfg: TuneConfig, prepared: Prepared) -> _Inputs:
    """Load, tokenize and split the documents (before the model loads: a bad split is cheap)."""
    from ctxext.data import load_documents, tokenize_documents
    from ctxext.modeling import load_tokenizer

    docs = load_documents(cfg.data, split="heldout")
    tokenizer = load_tokenizer(prepared.source.path)
    ids = tokenize_documents(tokenizer, docs)
    search, report = split_documents(ids, cfg, tokenizer.bos_token_id)
    return _Inputs(docs, ids, tokenizer.bos_token_id, search, report)


def _search(
    cfg: TuneConfig,
    prepared: Prepared,
    scorer: Scorer,
    progress: Progress,
    on_budget: Callable[[int], None] | None,
) -> tuple[Search, dict[str, Trial], dict[str, Any]]:
    """Calibrate, allocate the budget and run the search; returns it, each method's best, the
    allocation and timing."""
    trained = prepared.info.trained_length
    t_target, t_trained = _calibrate(scorer, trained)
    # Counted by tokens, not by the clock, so a given --budget-evals always buys the same allocation.
    scorer.cost_ratio = trained / cfg.target_length
    budget = cfg.budget_evals or max(12, int(cfg.budget_minutes * 60 / t_target))
    allocation = allocate_budget(cfg, budget, scorer.cost_ratio)
    if on_budget is not None:
        on_budget(budget)
    search = Search(scorer, cfg, prepared.info, np.random.default_rng(cfg.seed), progress)
    started = time.time()
    best = run_search(search, allocation)
    if not best:
        raise CtxextError(
            f"every candidate cost more than {cfg.guard:.0%} at the trained length {trained}: "
            "raise --guard or --budget-minutes"
        )
    timing = {
        "forward_seconds_at_target": t_target,
        "forward_seconds_at_trained": t_trained,
        "search_seconds": round(time.time() - started, 1),
        "forwards_spent": round(scorer.spent, 1),
    }
    return search, best, {"plan": allocation.__dict__, "timing": timing}


def run_tune(
    cfg: TuneConfig,
    prepared: Prepared,
    progress: Progress,
    on_budget: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Search, then evaluate the leaderboard on the report documents; returns tune.json."""
    from ctxext.data import data_fingerprint
    from ctxext.modeling import load_causal_lm

    data = _inputs(cfg, prepared)
    model = load_causal_lm(str(prepared.source.path)).model
    n, trained = cfg.target_length, prepared.info.trained_length

    rope_now = RopeNow()  # one model, so one record of its rope for both Scorers

    def scorer(which: list[int]) -> Scorer:
        docs = [data.ids[i] for i in which]
        return Scorer(model, prepared.config, docs, data.bos, n, rope_now=rope_now)

    search, best, run = _search(cfg, prepared, scorer(data.search), progress, on_budget)
    chosen = min(best, key=lambda m: best[m].ppl_target)
    lengths = sorted(set(cfg.report_lengths or [trained, n]) | {trained, n})
    started = time.time()
    runs = evaluate_rows(scorer(data.report), leaderboard_candidates(best), lengths)
    run["timing"]["report_seconds"] = round(time.time() - started, 1)
    return {
        "ctxext_tune": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": checkpoint.versions(),
        "config": cfg.model_dump(mode="json"),
        "model": {"name": prepared.source.name, "trained_length": trained},
        "data": {
            "source": cfg.data or "stdlib (held-out part of the bundled model's corpus)",
            "fingerprint": data_fingerprint(data.docs),
            "search_documents": [data.docs[i].name for i in data.search],
            "report_documents": [data.docs[i].name for i in data.report],
        },
        "protocol": _protocol(cfg, trained, runs),
        **run,
        "guard_reference_ppl": search.guard_ref(list(range(cfg.search_docs))),
        "candidates": [t.record() for t in search.trials.values()],
        "best_per_method": {m: t.record() for m, t in best.items()},
        "chosen": {"method": chosen, "extend": best[chosen].candidate.spec(n).model_dump()},
        "report": {"lengths": lengths, "runs": runs},
        "leaderboard": ranked_rows(runs, n, trained),
    }


def _protocol(cfg: TuneConfig, trained: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    first = next(iter(runs[0]["ppl"].values()))["protocol"]
    return {
        "ppl": first["name"],
        "description": first["description"],
        "search_score": f"token-weighted ppl at {cfg.target_length} on the search documents",
        "guard": f"ppl at {trained} on the same documents <= (1 + {cfg.guard}) x the unscaled "
        "model's; otherwise rejected",
        "report": "every leaderboard row on the same report documents at every length; no "
        "report document was seen by the search",
    }


def write_tune_output(result: dict[str, Any], prepared: Prepared, link_mode: str) -> Path:
    """The extended checkpoint plus tune.json, recipe.yaml, leaderboard.md and .png, atomically."""
    from ctxext.config import ExtendJob
    from ctxext.extend import plan_extend, write_checkpoint_files
    from ctxext.report.markdown import leaderboard_markdown
    from ctxext.report.plots import plot_leaderboard

    spec = ExtendConfig.model_validate(result["chosen"]["extend"])
    job = ExtendJob(
        model=str(prepared.source.path), output=prepared.output, extend=spec,
        link_mode=link_mode, overwrite=True,
    )  # fmt: skip
    n, trained = result["config"]["target_length"], result["model"]["trained_length"]
    with outputs.atomic_output(prepared.output) as tmp:
        write_checkpoint_files(plan_extend(job.model, spec), job, tmp)
        (tmp / "tune.json").write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")
        (tmp / "recipe.yaml").write_text(recipe_snippet(result))
        (tmp / "leaderboard.md").write_text(leaderboard_markdown(result["leaderboard"], n, trained))
        plot_leaderboard(result["leaderboard"], n, trained, tmp / "leaderboard.png")
    return prepared.output
