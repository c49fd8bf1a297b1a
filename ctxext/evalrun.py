"""`ctxext eval` pipeline: several checkpoints x several scaling methods x several lengths.

Each *variant* is a checkpoint, optionally with a scaling method applied in memory (the config
is rewritten before the model is built; nothing is written). Every variant is measured with
the same data and protocol, and the results carry enough provenance to be compared later.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ctxext import checkpoint
from ctxext.config import EvalConfig, ExtendConfig

#: progress_factory(description, total_tokens) -> callback(tokens_done)
ProgressFactory = Callable[[str, int], Callable[[int], None]]


@dataclass(frozen=True)
class Variant:
    """One row of the results table."""

    model: str | None
    extend: ExtendConfig | None = None


def plan_variants(
    models: list[str | None],
    methods: list[str],
    extend_options: dict[str, Any],
    cfg: EvalConfig,
) -> list[Variant]:
    """Base rows (unless excluded) and one row per model x method.

    Without --factor/--target-length a method scales to the longest evaluated length, the
    usual question being "how well does it read at the longest length I care about".
    """
    from ctxext.config import parse_model

    opts = dict(extend_options)
    if opts.get("factor") is None and opts.get("target_length") is None:
        opts["target_length"] = max(cfg.lengths)
    variants: list[Variant] = []
    for model in models or [None]:
        if cfg.include_base or not methods:
            variants.append(Variant(model))
        for method in methods:
            spec = parse_model(ExtendConfig, {"method": method, **opts}, "extend options")
            variants.append(Variant(model, spec))
    return variants


def run_eval(
    variants: list[Variant],
    cfg: EvalConfig,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress_factory: ProgressFactory | None = None,
    preflight: Callable[[dict[str, list[list[int]]]], None] | None = None,
) -> dict[str, Any]:
    """Evaluate every variant; returns the results document (see README, "results.json").

    ``preflight(token_cache)`` runs once the data is tokenized, before any model is loaded
    (the CLI's memory and time check).
    """
    from ctxext.data import data_fingerprint, load_documents

    docs = load_documents(
        cfg.data,
        split="heldout",
        text_field=cfg.text_field,
        dataset_split=cfg.dataset_split,
        fallback_encoding=cfg.fallback_encoding,
    )
    started = time.time()
    token_cache = _tokenize_for(variants, docs, cfg, trust_remote_code)
    if preflight is not None:
        preflight(token_cache)
    runs = [
        _run_variant(v, cfg, docs, token_cache, trust_remote_code, allow_pickle, progress_factory)
        for v in variants
    ]
    return {
        "ctxext_results": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - started, 2),
        "versions": checkpoint.versions(),
        "config": cfg.model_dump(mode="json"),
        "data": {
            "source": cfg.data or "stdlib (held-out part of the bundled model's corpus)",
            "fingerprint": data_fingerprint(docs),
            "n_documents": len(docs),
        },
        "protocol": _protocol_summary(runs),
        "runs": runs,
    }


def _tokenize_for(
    variants: list[Variant], docs: list, cfg: EvalConfig, trust_remote_code: bool
) -> dict[str, list[list[int]]]:
    """Tokenize the data once per tokenizer, and check every length has a long enough
    document *before* any model is loaded (a bad request fails in seconds, not minutes)."""
    from ctxext import evaluate
    from ctxext.data import tokenize_documents
    from ctxext.modeling import load_tokenizer

    cache: dict[str, list[list[int]]] = {}
    for variant in variants:
        path = checkpoint.resolve_model(variant.model).path
        if str(path) in cache:
            continue
        tok = load_tokenizer(path, trust_remote_code)
        cache[str(path)] = ids = tokenize_documents(tok, docs)
        if "ppl" in cfg.tasks:
            for n in cfg.lengths:
                evaluate.planned_tokens(
                    ids, n, bos_token_id=tok.bos_token_id, stride=cfg.stride,
                    num_docs=cfg.num_docs, seed=cfg.seed,
                )  # fmt: skip
        if "passkey" in cfg.tasks:
            for n in cfg.lengths:  # raises if a length cannot hold the prompt
                evaluate.build_passkey_prompt(tok, n, 0.5, "12345")
    return cache


def _run_variant(
    variant: Variant,
    cfg: EvalConfig,
    docs: list,
    token_cache: dict[str, list[list[int]]],
    trust_remote_code: bool,
    allow_pickle: bool,
    progress_factory: ProgressFactory | None,
) -> dict[str, Any]:
    from ctxext import evaluate, rope
    from ctxext.modeling import load_causal_lm

    loaded = load_causal_lm(
        variant.model,
        extend=variant.extend,
        dtype=cfg.dtype,
        device_map=cfg.device_map,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
    )
    tok = loaded.tokenizer
    doc_ids = token_cache[str(loaded.source.path)]
    bos = tok.bos_token_id
    info = rope.analyze(loaded.config)
    run: dict[str, Any] = {
        "label": loaded.label,
        "model": loaded.source.name,
        "model_path": str(loaded.source.path),
        "method": variant.extend.method if variant.extend else None,
        "extend": variant.extend.model_dump() if variant.extend else None,
        "trained_length": info.trained_length,
        "rope": {"scheme": info.scheme, "existing_scaling": info.existing_scaling},
        "config_sha256": checkpoint.config_hash(loaded.config),
        "dtype": str(loaded.model.dtype).removeprefix("torch."),
        "device": loaded.device,
        "ppl": {},
    }
    if "ppl" in cfg.tasks:
        common = {"bos_token_id": bos, "stride": cfg.stride, "num_docs": cfg.num_docs}
        total = sum(
            evaluate.planned_tokens(doc_ids, n, seed=cfg.seed, **common) for n in cfg.lengths
        )
        tick = _ticker(progress_factory, f"{loaded.label} ppl", total)
        offset = 0
        for length in cfg.lengths:
            res = evaluate.evaluate_perplexity(
                loaded.model,
                doc_ids,
                length,
                seed=cfg.seed,
                progress=lambda done, base=offset: tick(base + done),
                **common,
            )
            offset += evaluate.planned_tokens(doc_ids, length, seed=cfg.seed, **common)
            run["ppl"][str(length)] = res.to_dict()
    if "passkey" in cfg.tasks:
        total = sum(cfg.lengths) * len(cfg.passkey_depths) * cfg.passkey_trials
        tick = _ticker(progress_factory, f"{loaded.label} passkey", total)
        run["passkey"] = evaluate.evaluate_passkey(
            loaded.model,
            tok,
            cfg.lengths,
            depths=cfg.passkey_depths,
            trials=cfg.passkey_trials,
            seed=cfg.seed,
            progress=tick,
        ).to_dict()
    del loaded
    return run


def _ticker(factory: ProgressFactory | None, what: str, total: int) -> Callable[[int], None]:
    if factory is None:
        return lambda done: None
    return factory(what, total)


def _protocol_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The protocol stated once at the top (identical for every run by construction)."""
    out: dict[str, Any] = {}
    for run in runs:
        for res in run["ppl"].values():
            out["ppl"] = {k: v for k, v in res["protocol"].items() if k != "description"}
            out["ppl"]["description"] = f"at L={res['length']}: {res['protocol']['description']}"
            break
        if "passkey" in run:
            out["passkey"] = run["passkey"]["protocol"]
    return out
