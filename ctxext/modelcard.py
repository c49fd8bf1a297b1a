"""Hugging Face model card (README.md) for a checkpoint a recipe wrote.

Built with ``huggingface_hub.ModelCard`` / ``ModelCardData``: the YAML metadata names the base
model, carries the evaluation results as ``model-index`` entries (one ``EvalResult`` per
metric and length) and tags; the body says what was done and shows every compared variant.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

from ctxext.text import plural

__all__ = ["build_model_card", "eval_results", "write_model_card"]

TASK = "text-generation"


def _dataset(results: dict[str, Any]) -> tuple[str, str]:
    """(dataset_type, dataset_name) for the model index: a Hub dataset id when there is one."""
    source = results["config"].get("data")
    if source is None or source == "stdlib":
        return "python-stdlib-heldout", "Python standard library (held-out files)"
    return source, Path(source).name if Path(source).exists() else source


def eval_results(info: dict[str, Any]) -> list[Any]:
    """EvalResult entries for the checkpoint's own rows: perplexity and passkey per length."""
    from huggingface_hub import EvalResult

    results = info.get("results")
    if not results:
        return []
    dataset_type, dataset_name = _dataset(results)
    protocol = results.get("protocol", {}).get("ppl", {}).get("name", "first L tokens")
    out = []
    for run in info.get("own_runs", []):
        for length, res in sorted(run["ppl"].items(), key=lambda kv: int(kv[0])):
            if res["ppl"] is None or not math.isfinite(res["ppl"]):
                continue
            out.append(
                EvalResult(
                    task_type=TASK,
                    task_name="Long-context language modeling",
                    dataset_type=dataset_type,
                    dataset_name=dataset_name,
                    metric_type="perplexity",
                    metric_name=f"perplexity @ {length} tokens",
                    metric_config=f"context_length={length}, protocol={protocol}",
                    metric_value=round(float(res["ppl"]), 4),
                )
            )
        pk = run.get("passkey")
        if pk:
            for length in pk["lengths"]:
                out.append(
                    EvalResult(
                        task_type=TASK,
                        task_name="Passkey retrieval",
                        dataset_type="passkey-retrieval",
                        dataset_name="Passkey retrieval (synthetic)",
                        metric_type="accuracy",
                        metric_name=f"passkey accuracy @ {length} tokens",
                        metric_config=f"context_length={length}",
                        metric_value=round(float(pk["mean_by_length"][str(length)]), 4),
                    )
                )
    return out


def _body(info: dict[str, Any]) -> str:
    from ctxext.report.markdown import context_use_markdown, passkey_markdown, ppl_markdown

    base = info["base_model"]
    base_ref = f"[{base}](https://huggingface.co/{base})" if info["base_is_hub"] else f"`{base}`"
    lines = [f"# {info['model_name']}", ""]
    if info.get("description"):
        lines += [" ".join(info["description"].split()), ""]
    lines += [
        f"A context-extended version of {base_ref}, written by "
        f"[ctxext](https://pypi.org/project/ctxext/) from the recipe `{info['recipe_name']}`.",
        "",
        "## What was done",
        "",
    ]
    ext = info.get("extend")
    if ext:
        lines.append(
            f"- RoPE scaling **{ext['method']}**, factor {info['factor']:g}: trained length "
            f"{info['trained_length']} -> {info['new_length']} tokens. The config carries "
            "`rope_parameters`, the legacy `rope_scaling` mirror and `rope_theta`, so "
            "transformers, vLLM, SGLang, TGI and llama.cpp read the same frequencies."
        )
    ft, summary = info.get("finetune"), info.get("finetune_summary")
    if ft and summary:
        kind = f"LoRA rank {ft['lora_rank']} (merged)" if ft["lora_rank"] else "full fine-tune"
        pose = f", PoSE windows of {ft['train_length']} tokens" if ft["pose"] else ""
        lines.append(
            f"- Fine-tune: {kind}{pose}, {plural(ft['steps'], 'step')} x "
            f"{plural(summary['global_batch'], 'sequence')} of {summary['train_length']} tokens, "
            f"lr {ft['lr']:g}, AdamW ({ft['adam_beta1']}, {ft['adam_beta2']}), "
            f"{plural(summary['warmup_steps'], 'warm-up step')}; "
            f"data {summary['data']['source']} ({summary['data']['tokens']:,} tokens)."
        )
    elif not ft:
        lines.append("- No fine-tuning: the weights are those of the base model.")
    results = info.get("results")
    if results:
        lines += ["", "## Evaluation", ""]
        proto = results.get("protocol", {}).get("ppl", {})
        if proto.get("description"):
            lines += [f"Perplexity protocol: {proto['description']}", ""]
        if "ppl" in results["config"]["tasks"]:
            lines += [ppl_markdown(results), ""]
        pk = passkey_markdown(results)
        if pk:
            lines += ["Passkey retrieval accuracy (mean over depths):", "", pk, ""]
        use = context_use_markdown(results)
        if use:
            lines += ["### Context use", "", use, ""]
    prov = info["provenance"]
    versions = ", ".join(f"{k} {v}" for k, v in prov["versions"].items())
    lines += [
        "",
        "## Reproduce",
        "",
        "The resolved recipe is `recipe.yaml` next to this folder; `ctxext run recipe.yaml "
        "--output-dir NEW_FOLDER` repeats the run (same seed, same numbers on the same CPU).",
        "",
        f"Seed {prov['seed']}; {versions}.",
        "",
    ]
    return "\n".join(lines)


def build_model_card(info: dict[str, Any]) -> Any:  # -> huggingface_hub.ModelCard
    """The card for one checkpoint (``info``: :func:`ctxext.recipes.provenance.card_info`)."""
    from huggingface_hub import ModelCard, ModelCardData

    tags = ["ctxext", "long-context", "rope-scaling"]
    if info.get("extend"):
        tags.append(info["extend"]["method"])
    if info.get("finetune"):
        tags.append("pose" if info["finetune"]["pose"] else "fine-tuned")
    results = eval_results(info)
    # base_model: the Hub id, or for a bundled/local model its name (no Hub id exists).
    data = ModelCardData(
        base_model=info["base_model"],
        library_name="transformers",
        pipeline_tag=TASK,
        tags=tags,
        model_name=info["model_name"],
        eval_results=results or None,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(info)}")


def write_model_card(path: Path, info: dict[str, Any]) -> Path:
    """Write README.md; a hard-linked file from the source checkpoint is replaced, not edited."""
    card = build_model_card(info)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    path.write_text(str(card), encoding="utf-8")
    return path
