"""`ctxext eval` pipeline: several checkpoints x several scaling methods x several lengths.

:func:`evaluate_and_report` is the whole command below the CLI (variants, output checks, the
evaluation, the output folder); :func:`run_eval` is the evaluation alone (the recipe runner's).

Each *variant* (:mod:`~ctxext.evaluate.variants`) is a checkpoint, optionally with a scaling
method applied in memory. Every variant is measured with the same data and protocol, and the
results carry enough provenance to be compared later.

The flow goes one way: this module reads the config and calls each task with plain arguments
(:mod:`~ctxext.evaluate.perplexity`, :mod:`~ctxext.evaluate.passkey`,
:mod:`~ctxext.evaluate.retrieval`, :mod:`~ctxext.evaluate.context_use`,
:mod:`~ctxext.evaluate.longppl` through :mod:`~ctxext.evaluate.run_context`,
:mod:`~ctxext.evaluate.effective_length`), which use the loss and the protocol below them; no
task sees the config or imports this module. The caller's hooks (the budget check, progress
bars) are the only calls back up.

Each model is resolved once for the whole command (a Hub model at one commit), its tokenizer
loaded once and its weights loaded once: the next method of the same model changes the rope
of the loaded model in place (:func:`ctxext.modeling.rescale`, equal to a fresh load).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctxext import checkpoint, locate, outputs
from ctxext.config import EvalConfig
from ctxext.errors import CtxextError
from ctxext.evaluate.variants import Sources, Variant, loader, plan_variants, resolve_models

#: progress_factory(description, total_tokens) -> callback(tokens_done)
ProgressFactory = Callable[[str, int], Callable[[int], None]]
#: budget_check(sources, token_cache): the CLI's memory and time check.
BudgetCheck = Callable[[Sources, dict[str, Any]], None]


def run_eval(
    variants: list[Variant],
    cfg: EvalConfig,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress_factory: ProgressFactory | None = None,
    budget_check: BudgetCheck | None = None,
    sources: Sources | None = None,
    reference_of: dict[str | None, str | None] | None = None,
    references: dict[str | None, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate every variant; returns the results document (see README, "results.json").

    Everything that can be refused is checked first (:func:`preflight`), so a bad request
    fails in seconds, before the first model is loaded. ``budget_check(sources, token_cache)``
    runs once the data is tokenized, before any model is loaded (the CLI's memory and time
    check). ``sources``: the models, resolved already (:func:`resolve_models`); each model is
    resolved once for the whole run and its weights loaded once (:func:`_run_variants`).

    The effective length judges each row against its reference model's unscaled retrieval
    (:mod:`ctxext.evaluate.reference`): ``reference_of`` maps a row's model to that model
    (default: itself); ``references``, figures already measured, is filled with those measured
    here (a recipe's later evaluation reuses its earlier one's).
    """
    from ctxext.data import data_fingerprint
    from ctxext.evaluate.reference import attach_effective_lengths, drop_unfit, plan_references

    references = {} if references is None else references
    sources = {} if sources is None else sources  # updated in place, as preflight does
    sources.update(resolve_models([v.model for v in variants if v.model not in sources]))
    if cfg.reference_model is not None:  # named: it judges every row
        rows = [v.model for v in variants]
        reference_of = dict.fromkeys(rows, _reference_key(cfg.reference_model, sources, rows))
    reference_of = reference_of or {}
    refs = [reference_of.get(v.model, v.model) for v in variants]
    sources.update(resolve_models([m for m in refs if m not in references and m not in sources]))
    plans = plan_references(variants, cfg, sources, reference_of, known=references)
    extra = {m: [p.length] for m, p in plans.items()}
    source, docs, token_cache = preflight(
        variants, cfg, sources, trust_remote_code, allow_pickle, extra
    )
    unfit = {m: token_cache[str(sources[m].path)].unfit for m in plans}
    plans = drop_unfit(plans, unfit, references, {m: sources[m].name for m in plans})
    started = time.time()
    if budget_check is not None:
        budget_check(sources, token_cache)
    tokenizer_of = lambda source: token_cache[str(source.path)].tokenizer  # noqa: E731
    load = loader(cfg, sources, tokenizer_of, trust_remote_code, allow_pickle, progress_factory)
    rows = _run_variants(variants, cfg, token_cache, plans, references, load, progress_factory)
    attach_effective_lengths(rows, cfg, plans, references, reference_of)
    runs = [run for _, run, _, _ in rows]
    return {
        "ctxext_results": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - started, 2),
        "versions": checkpoint.versions(),
        "config": cfg.model_dump(mode="json"),
        "data": {
            "source": cfg.data or "stdlib (held-out part of the bundled model's corpus)",
            "split": source.split,
            "fingerprint": data_fingerprint(docs),
            "n_documents": len(docs),
        },
        "protocol": _protocol_summary(runs, cfg),
        "runs": runs,
    }


def _reference_key(model: str, sources: Sources, rows: list[str | None]) -> str | None:
    """The row model that is ``model`` (the same folder, however named: the bundled model is
    also the rows' default None), so that its unscaled row is reused; else ``model`` itself,
    resolved into ``sources``."""
    if model not in sources:
        sources.update(resolve_models([model]))
    same = [m for m in rows if sources[m].path == sources[model].path]
    return same[0] if same else model


@dataclass(frozen=True)
class EvalHooks:
    """What the caller shows around :func:`evaluate_and_report` (the CLI: its memory/time
    check, a progress bar, tables); every hook is optional."""

    #: variants per model -> ``budget_check(sources, token_cache)`` for :func:`run_eval`.
    budget: Callable[[int], BudgetCheck] | None = None
    #: a context manager around the evaluation that yields its progress factory (or None).
    progress: Callable[[], contextlib.AbstractContextManager[ProgressFactory | None]] = (
        contextlib.nullcontext
    )
    #: called with the results before the output folder is written.
    render: Callable[[dict[str, Any]], None] | None = None
    #: called with the output folder (made absolute) once it is written.
    written: Callable[[Path], None] | None = None
    #: the check prints a plan and stops the run: no output folder is checked or locked.
    plan_only: bool = False


def evaluate_and_report(
    models: list[str | None],
    methods: list[str],
    options: dict[str, Any],
    cfg: EvalConfig,
    output: Path | None,
    overwrite: bool,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    hooks: EvalHooks | None = None,
) -> dict[str, Any]:
    """Evaluate every model x method and write results.json/.csv and plots to ``output``.

    The output folder is checked before anything slow and written atomically while it is
    locked (one writer per output).
    """
    from ctxext.report.files import write_outputs

    hooks = hooks or EvalHooks()
    variants = plan_variants(models, methods, options, cfg)
    # Once for the whole command; a named reference model too (a bad name is refused before
    # anything slow, and an output folder may not replace it).
    named = [cfg.reference_model] if cfg.reference_model is not None else []
    sources = resolve_models([v.model for v in variants] + named)
    locked = output is not None and not hooks.plan_only
    if locked:
        inputs = [src.path for src in sources.values()]
        output = outputs.check_output_path(output, inputs, overwrite)
    budget_check = hooks.budget(len(variants) // len(models)) if hooks.budget else None
    with outputs.output_lock(output) if locked else contextlib.nullcontext():
        with hooks.progress() as progress_factory:
            results = run_eval(
                variants,
                cfg,
                trust_remote_code=trust_remote_code,
                allow_pickle=allow_pickle,
                progress_factory=progress_factory,
                budget_check=budget_check,
                sources=sources,
            )
        if hooks.render is not None:
            hooks.render(results)
        if output is not None:
            with outputs.atomic_output(output) as tmp:
                write_outputs(results, tmp)
            if hooks.written is not None:
                hooks.written(output)
    return results


@dataclass(frozen=True)
class _Tokens:
    """The data as one tokenizer sees it."""

    docs: Any  # protocol.TokenizedDocs
    bos_token_id: int | None
    fingerprint: str  # of the token ids (and BOS): equal fingerprints, comparable perplexities
    tokenizer: Any  # the one that made them, loaded once and given to the model's loads
    unfit: dict[int, str]  # a reference length its retrieval prompts do not fit, and why


@contextlib.contextmanager
def _naming(who: str) -> Iterator[None]:
    """Prefix a refusal with the model (and method) it concerns."""
    try:
        yield
    except CtxextError as e:
        raise type(e)(f"{who}: {e}") from e


def _who(variant: Variant) -> str:
    name = variant.model or locate.DEFAULT_MODEL
    return f"{name} (-m {variant.extend.method})" if variant.extend else name


def preflight(
    variants: list[Variant],
    cfg: EvalConfig,
    sources: Sources,
    trust_remote_code: bool,
    allow_pickle: bool,
    extra_lengths: dict[str | None, list[int]] | None = None,
) -> tuple[Any, list, dict[str, _Tokens]]:
    """Check every model x method x length before anything slow; returns the data, tokenized.

    Cheapest first: every config.json (already scaled, length not beyond the trained length,
    not a causal LM, no weights, no tokenizer files), then the data, then each tokenizer with
    the lengths (too-short data, a passkey prompt that does not fit). No weights are loaded.
    A Hub model's tokenizer files are fetched (``sources`` is updated with them).
    ``extra_lengths``: per model, the reference's length: where its retrieval prompts do not
    fit, ``_Tokens.unfit`` says why (the rows are judged without it).
    """
    from ctxext.data import EVAL_SPLITS, eval_documents, open_source
    from ctxext.modeling import check_tokenizer_files, check_weights, scaled_config

    for variant in variants:
        with _naming(_who(variant)):
            scaled_config(sources[variant.model], variant.extend)
    paths: dict[str, str] = {}
    extra: dict[str, list[int]] = {}
    for model in sources:
        with _naming(_who(Variant(model))):
            source = sources[model] = locate.fetch(sources[model], "tokenizer")
            if source.repo_id is None:  # a Hub model's weights are checked when fetched
                check_weights(source.path, allow_pickle)
            check_tokenizer_files(source.path)
        paths.setdefault(str(source.path), source.name)
        extra.setdefault(str(source.path), []).extend((extra_lengths or {}).get(model, []))
    tokenizer = _tokenizers(trust_remote_code)
    source = open_source(
        cfg.data,
        split="heldout",
        text_field=cfg.text_field,
        dataset_config=cfg.dataset_config,
        dataset_split=cfg.dataset_split,
        default_splits=EVAL_SPLITS,
        fallback_encoding=cfg.fallback_encoding,
    )
    long_enough = None
    if source.streamed and "ppl" in cfg.tasks:
        long_enough = _long_enough(tokenizer(sources[variants[0].model].path), cfg)
    docs = eval_documents(source, seed=cfg.seed, num_docs=cfg.num_docs, long_enough=long_enough)
    cache = {}
    for path, name in paths.items():
        with _naming(name):
            cache[path] = _tokenize_and_check(tokenizer(Path(path)), docs, cfg, extra[path])
    return source, docs, cache


def _tokenizers(trust_remote_code: bool) -> Callable[[Path], Any]:
    """path -> its tokenizer, each loaded once."""
    from ctxext.modeling import load_tokenizer

    loaded: dict[Path, Any] = {}

    def get(path: Path) -> Any:
        if path not in loaded:
            loaded[path] = load_tokenizer(path, trust_remote_code)
        return loaded[path]

    return get


def _long_enough(tok: Any, cfg: EvalConfig) -> Any:
    """Whether a document is long enough for every length (a BOS is prepended when scoring):
    a streamed dataset is walked until --num-docs such documents are found."""
    need = max(cfg.lengths) - (tok.bos_token_id is not None)
    return lambda doc: len(tok(doc.text, add_special_tokens=False)["input_ids"]) >= need


def _tokenize_and_check(tok: Any, docs: list, cfg: EvalConfig, extra: list[int]) -> _Tokens:
    from ctxext.evaluate.passkey import build_passkey_prompt
    from ctxext.evaluate.protocol import (
        check_longest,
        perplexity_sweep_tokens,
        select_documents,
        tokenize_for_eval,
    )
    from ctxext.evaluate.reference import retrieval_fits
    from ctxext.evaluate.run_context import selection

    texts = [d.text for d in docs]
    context = {"context-use", "longppl"} & set(cfg.tasks)  # whole documents, a cut context
    if "ppl" in cfg.tasks or context:  # before tokenizing every document
        check_longest(tok, texts, max(cfg.lengths), tok.bos_token_id is not None)
    tokens = tokenize_for_eval(tok, texts)
    bos = tok.bos_token_id
    if "ppl" in cfg.tasks:  # raises when no document is long enough
        perplexity_sweep_tokens(tokens.ids, cfg.lengths, **_ppl_options(cfg, bos))
    if "passkey" in cfg.tasks:
        for n in cfg.lengths:  # raises if a length cannot hold the prompt
            build_passkey_prompt(tok, n, 0.5, "12345")
    unfit = {}
    if "retrieval" in cfg.tasks:
        for n in cfg.lengths:  # raises if the text is too short or a length too small
            retrieval_fits(tok, tokens.ids, cfg, n)
        for n in sorted(set(extra) - set(cfg.lengths)):  # the reference: judged without it
            try:
                retrieval_fits(tok, tokens.ids, cfg, n)
            except CtxextError as e:
                unfit[n] = str(e)
    if context:  # raises when no document holds the longest length
        select_documents(tokens.ids, cfg.lengths, **selection(cfg, bos))
    return _Tokens(tokens, bos, _token_fingerprint(tokens.ids, bos), tok, unfit)


def _token_fingerprint(ids: list[list[int]], bos: int | None) -> str:
    h = hashlib.sha256(str(bos).encode())
    for doc in ids:
        arr = np.asarray(doc, dtype=np.int64)
        h.update(np.int64(len(arr)).tobytes())
        h.update(arr.tobytes())
    return h.hexdigest()[:16]


def _ppl_options(cfg: EvalConfig, bos: int | None) -> dict[str, Any]:
    return {
        "bos_token_id": bos,
        "stride": cfg.stride,
        "num_docs": cfg.num_docs,
        "seed": cfg.seed,
        "doc_selection": cfg.doc_selection,
    }


def _run_variants(
    variants: list[Variant],
    cfg: EvalConfig,
    token_cache: dict[str, _Tokens],
    plans: dict[str | None, Any],
    references: dict[str | None, Any],
    load: Callable[..., Any],
    progress_factory: ProgressFactory | None,
) -> list[tuple[Variant, dict[str, Any], Any, dict[int, Any]]]:
    """The references no row provides first (:mod:`~ctxext.evaluate.reference`), then each
    row: (variant, its run document, its retrieval result, its far-context gains).

    Each model's weights loaded once: the next method of the same model gets its rope in
    place (:func:`ctxext.modeling.rescale`, equal to a fresh load); a model whose rope cannot
    be swapped exactly is loaded again."""
    from ctxext.evaluate.reference import score_references
    from ctxext.modeling import rescale

    rows = []
    doc_ids = lambda loaded: token_cache[str(loaded.source.path)].docs.ids  # noqa: E731
    loaded, previous = score_references(plans, references, load, doc_ids, cfg, progress_factory)
    for variant in variants:
        if loaded is not None:
            loaded = rescale(loaded, variant.extend) if variant.model == previous else None
        if loaded is None:  # the previous model is released first: one model in memory
            loaded = load(variant.model, variant.extend)
        previous = variant.model
        rows.append((variant, *_run_variant(variant, loaded, cfg, token_cache, progress_factory)))
    return rows


def _run_variant(
    variant: Variant,
    loaded: Any,
    cfg: EvalConfig,
    token_cache: dict[str, _Tokens],
    progress_factory: ProgressFactory | None,
) -> tuple[dict[str, Any], Any, dict[int, Any]]:
    from ctxext import rope
    from ctxext.evaluate.loss import length_dependent_rope
    from ctxext.evaluate.passkey import evaluate_passkey
    from ctxext.evaluate.perplexity import evaluate_lengths
    from ctxext.evaluate.protocol import perplexity_sweep_tokens
    from ctxext.evaluate.reference import score_retrieval, ticker
    from ctxext.evaluate.run_context import context_use_task, longppl_task

    tokens = token_cache[str(loaded.source.path)]
    info = rope.analyze(loaded.config)
    run: dict[str, Any] = {
        "label": loaded.label,
        "model": loaded.source.name,
        "model_path": str(loaded.source.path),
        "source": loaded.source.record(),
        "method": variant.extend.method if variant.extend else None,
        "extend": variant.extend.model_dump() if variant.extend else None,
        "trained_length": info.trained_length,
        "rope": {"scheme": info.scheme, "existing_scaling": info.existing_scaling},
        "config_sha256": checkpoint.config_hash(loaded.config),
        "tokens_fingerprint": tokens.fingerprint,
        "dtype": str(loaded.model.dtype).removeprefix("torch."),
        "device": loaded.device,
        "attn_implementation": loaded.model.config._attn_implementation,
        "sliding_window": rope.read.sliding_window(loaded.config, max(cfg.lengths)),
        "ppl": {},
    }
    if "ppl" in cfg.tasks:
        opts = _ppl_options(cfg, tokens.bos_token_id)
        one_pass = not length_dependent_rope(loaded.model)
        ids = tokens.docs.ids
        total = perplexity_sweep_tokens(ids, cfg.lengths, one_pass=one_pass, **opts)
        results = evaluate_lengths(
            loaded.model,
            ids,
            cfg.lengths,
            token_bytes=tokens.docs.token_bytes,
            one_pass=one_pass,
            progress=ticker(progress_factory, f"{loaded.label} ppl", total),
            **opts,
        )
        run["ppl"] = {str(n): res.to_dict() for n, res in results.items()}
    if "passkey" in cfg.tasks:
        total = sum(cfg.lengths) * len(cfg.passkey_depths) * cfg.passkey_trials
        tick = ticker(progress_factory, f"{loaded.label} passkey", total)
        run["passkey"] = evaluate_passkey(
            loaded.model,
            loaded.tokenizer,
            cfg.lengths,
            depths=cfg.passkey_depths,
            trials=cfg.passkey_trials,
            seed=cfg.seed,
            progress=tick,
        ).to_dict()
    gains, retrieval = {}, None
    tick = functools.partial(ticker, progress_factory)
    if "context-use" in cfg.tasks:
        gains, fingerprint = context_use_task(loaded, tokens, cfg, info.trained_length, tick)
        run["context_use"] = {
            str(n): {**g.to_dict(), "doc_fingerprint": fingerprint} for n, g in gains.items()
        }
    if "longppl" in cfg.tasks:
        run["longppl"] = longppl_task(loaded, tokens, cfg, info.trained_length, tick)
    if "retrieval" in cfg.tasks:
        what = f"{loaded.label} retrieval"
        retrieval = score_retrieval(
            loaded, tokens.docs.ids, cfg, cfg.lengths, progress_factory, what
        )
        run["retrieval"] = retrieval.to_dict()
    if "context-use" in cfg.tasks or "retrieval" in cfg.tasks:
        from ctxext.evaluate.effective_length import context_length

        run["context_length"] = context_length(info)  # the effective length: run_eval, after
    return run, retrieval, gains


def _protocol_summary(runs: list[dict[str, Any]], cfg: EvalConfig) -> dict[str, Any]:
    """The protocol stated once at the top (identical for every run by construction)."""
    out: dict[str, Any] = {}
    for run in runs:
        for res in run["ppl"].values():
            out["ppl"] = {k: v for k, v in res["protocol"].items() if k != "description"}
            out["ppl"]["description"] = f"at L={res['length']}: {res['protocol']['description']}"
            break
        if "passkey" in run:
            out["passkey"] = run["passkey"]["protocol"]
        for key in ("context_use", "longppl"):
            for res in run.get(key, {}).values():
                out[key] = res["protocol"]
                break
        if "retrieval" in run:
            out["retrieval"] = run["retrieval"]["protocol"]
        if "effective_length" in run:
            from ctxext.evaluate.effective_length import rule_text

            out["effective_length"] = rule_text(cfg.effective_threshold)
    return out
