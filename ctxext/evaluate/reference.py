"""The reference of the effective-length rule (:mod:`ctxext.evaluate.effective_length`): the
unscaled model's retrieval per family at its trained length, and each run's effective length.

Every row is judged against the unscaled weights of its *reference model*: by default the row's
own model; in a recipe the base model before fine-tuning (``reference_of``). A model whose
config is already scaled (an extended or fine-tuned checkpoint) is scored with its original
rope (:func:`ctxext.rope.original_config`), or with its own config where that is not recorded
(static NTK, longrope; the detail says so). The length is the trained length, or the longest
evaluated length where every evaluated length is shorter (scoring a 128k-token model at 128k to
judge it at 8k would cost more than the evaluation).

Where a row of the evaluation is that model unscaled at that length, its own figures are reused;
otherwise the reference is scored once, before the rows, with the same templates, depths, trials
and seed (one length).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ctxext.config import EvalConfig
from ctxext.evaluate.effective_length import Reference, judge
from ctxext.evaluate.variants import Sources, Variant

#: The model whose unscaled weights judge a row, by the row's model (missing: itself).
ReferenceOf = Mapping[str | None, str | None]
#: progress_factory(description, total_tokens) -> callback(tokens_done)
ProgressFactory = Callable[[str, int], Callable[[int], None]]


@dataclass(frozen=True)
class ReferencePlan:
    """How one reference model's figures are obtained."""

    length: int
    reuse: bool
    """A row of this evaluation is the model unscaled at ``length``: its figures are reused."""
    rope_as_trained: bool
    """The config is scaled and records its original rope: load it with that."""
    note: str
    """Why the checkpoint's own (scaled) config is used, or ''."""


def plan_references(
    variants: list[Variant],
    cfg: EvalConfig,
    sources: Sources,
    reference_of: ReferenceOf,
    known: Mapping[str | None, Reference] | None = None,
) -> dict[str | None, ReferencePlan]:
    """Per reference model not ``known`` already, its length and where its figures come from
    (config files only)."""
    from ctxext import checkpoint, rope

    if "retrieval" not in cfg.tasks:
        return {}
    plans: dict[str | None, ReferencePlan] = {}
    longest = max(cfg.lengths)
    for variant in variants:
        model = reference_of.get(variant.model, variant.model)
        if model in plans or model in (known or {}):
            continue
        config = checkpoint.read_config(sources[model].path)
        info = rope.analyze(config)
        length = min(info.trained_length or longest, longest)
        scaled = info.scheme == "rope" and info.existing_scaling is not None
        recorded = rope.original_config(config) is not None
        note = ""
        if scaled and not recorded:
            kind = info.existing_scaling["rope_type"]  # type: ignore[index]
            note = f"its own config: the rope it was trained with is not recorded ({kind})"
        row = any(v.model == model and v.extend is None for v in variants)
        reuse = row and (not scaled or not recorded) and length in cfg.lengths
        plans[model] = ReferencePlan(length, reuse, scaled and recorded, note)
    return plans


def drop_unfit(
    plans: dict[str | None, ReferencePlan],
    unfit: Mapping[str | None, Mapping[int, str]],
    references: dict[str | None, Reference],
    names: Mapping[str | None, str],
) -> dict[str | None, ReferencePlan]:
    """The plans whose length holds the retrieval prompts; for the others, an empty reference
    in ``references`` saying why (their rows' retrieval is then not judged)."""
    kept = {}
    for model, plan in plans.items():
        why = unfit.get(model, {}).get(plan.length)
        if why is None:
            kept[model] = plan
        else:
            source = (
                f"not measured: its trained length {plan.length} cannot hold the prompt ({why})"
            )
            references[model] = Reference(names[model], plan.length, {}, source)
    return kept


def retrieval_fits(tok: Any, ids: list[list[int]], cfg: EvalConfig, n: int) -> None:
    """Raises if length ``n`` cannot hold a retrieval prompt of the config's templates (or the
    documents ``ids`` are too short to hide the key in)."""
    from ctxext.evaluate.passkey import build_passkey_prompt

    if cfg.template == "text":
        build_passkey_prompt(tok, n, 0.5, "12345")
        return
    from ctxext.evaluate.needles import build_prompt, resolve_templates

    longest = max(ids, key=len, default=[])
    for t in resolve_templates(cfg.template):
        build_prompt(tok, longest, n, 0.5, "12345", "Falcon Ridge 255", t)


def score_retrieval(
    loaded: Any,
    doc_ids: Any,
    cfg: EvalConfig,
    lengths: list[int],
    progress_factory: ProgressFactory | None,
    what: str,
) -> Any:
    """``evaluate_retrieval`` with the config's templates, depths, trials and seed."""
    from ctxext.evaluate.needles import resolve_templates
    from ctxext.evaluate.retrieval import evaluate_retrieval

    forms = 1 if cfg.template == "text" else len(resolve_templates(cfg.template))
    total = sum(lengths) * len(cfg.passkey_depths) * cfg.passkey_trials * forms
    return evaluate_retrieval(
        loaded.model,
        loaded.tokenizer,
        lengths,
        template=cfg.template,
        doc_token_ids=doc_ids,
        depths=cfg.passkey_depths,
        trials=cfg.passkey_trials,
        seed=cfg.seed,
        progress=ticker(progress_factory, what, total),
    )


def ticker(factory: ProgressFactory | None, what: str, total: int) -> Callable[[int], None]:
    if factory is None:
        return lambda done: None
    return factory(what, total)


def score_references(
    plans: dict[str | None, ReferencePlan],
    references: dict[str | None, Reference],
    load: Callable[..., Any],
    doc_ids: Callable[[Any], Any],
    cfg: EvalConfig,
    progress: ProgressFactory | None,
) -> tuple[Any, Any]:
    """Score each reference no row provides and ``references`` lacks, into ``references``, at
    its length, one model in memory: ``load(model, extend, rope_as_trained)`` loads it,
    ``doc_ids(loaded)`` gives the documents in its tokens. Returns the last model loaded and
    its name (None, a name no model has: nothing loaded), for the rows to reuse."""
    loaded, previous = None, object()
    for model, plan in plans.items():
        if plan.reuse or model in references:
            continue
        loaded = None  # the previous model is released first
        loaded, previous = load(model, None, plan.rope_as_trained), model
        what = f"reference {loaded.label} retrieval"
        # Keys are drawn from one seeded stream in length order, so a row's keys at L depend on
        # the lengths evaluated before L: scored after the same shorter lengths (cheap), the
        # reference sees the keys its model's row at L would see in this evaluation.
        lengths = [n for n in cfg.lengths if n < plan.length] + [plan.length]
        res = score_retrieval(loaded, doc_ids(loaded), cfg, lengths, progress, what)
        rope = "with the rope it was trained with" if plan.rope_as_trained else "unscaled"
        before = f"; keys drawn after the lengths {lengths[:-1]}, as a row's" if lengths[1:] else ""
        source = (
            f"scored once before the rows: {loaded.label}, {plan.note or rope}, at "
            f"{plan.length} (same templates and depths, {cfg.passkey_trials} trials per "
            f"template and depth, seed {cfg.seed}{before})"
        )
        references[model] = Reference.of(res, plan.length, loaded.label, source)
    return loaded, previous


def attach_effective_lengths(
    rows: list[tuple[Variant, dict[str, Any], Any, dict[int, Any]]],
    cfg: EvalConfig,
    plans: dict[str | None, ReferencePlan],
    references: dict[str | None, Reference],
    reference_of: ReferenceOf,
) -> None:
    """Each row's ``effective_length`` and ``effective_length_detail`` (rows: variant, its run
    document, its retrieval result or None, its far-context gains). A reference to be reused
    is taken from its row first; ``references`` gains it."""
    for variant, run, retrieval, _ in rows:
        plan = plans.get(variant.model)
        if plan is None or not plan.reuse or variant.extend is not None:
            continue
        if variant.model not in references and retrieval is not None:
            source = f"the row {run['label']}'s own retrieval at {plan.length}, reused"
            if plan.note:
                source += f" ({plan.note})"
            references[variant.model] = Reference.of(retrieval, plan.length, run["label"], source)
    for variant, run, retrieval, gains in rows:
        if "context_length" not in run:  # neither context-use nor retrieval was run
            continue
        reference = references.get(reference_of.get(variant.model, variant.model))
        detail = judge(cfg.lengths, retrieval, gains, reference, cfg.effective_threshold)
        run["effective_length"] = detail["effective_length"]
        run["effective_length_detail"] = detail
