"""report.md of a recipe run: what was done, the tables, the plots, provenance."""

from __future__ import annotations

from typing import Any

from ctxext.recipes.record import RunRecord
from ctxext.rope.methods import OPTIONS_OF
from ctxext.text import plural


def render_report(run: RunRecord, summary: dict[str, Any]) -> str:
    """report.md: what was done, the tables, the plots, provenance."""
    from ctxext.report.cells import sliding_window_lines
    from ctxext.report.markdown import context_use_markdown, passkey_markdown, ppl_markdown

    recipe, pre = run.recipe, run.pre
    prov = summary["provenance"]
    lines = [f"# ctxext run: {run.loaded.name}", ""]
    if recipe.description:
        lines += [" ".join(recipe.description.split()), ""]
    lines += ["## What was done", ""]
    lines.append(
        f"- **Model**: `{recipe.model or pre.name}` (trained length {pre.trained_length} tokens)."
    )
    if recipe.extend is not None:
        spec = recipe.extend
        opts = {
            k: v
            for k, v in spec.rope_options().items()
            # longrope's per-pair factor lists are in recipe.yaml, not on this line.
            if v is not None and k in OPTIONS_OF[spec.method] and not isinstance(v, list | tuple)
        }
        extra = f", {', '.join(f'{k}={v:g}' for k, v in opts.items())}" if opts else ""
        if spec.keep_short:
            extra += (
                f"; written as longrope, the trained frequencies up to {pre.trained_length} tokens"
            )
        lines.append(
            f"- **Extend**: {spec.method}, factor {pre.factor:g}{extra}: "
            f"{pre.trained_length} -> {pre.new_length} tokens (config rewrite; weights untouched)."
        )
    if recipe.finetune is not None and run.finetune_summary is not None:
        ft, s = recipe.finetune, run.finetune_summary
        kind = f"LoRA rank {ft.lora_rank}" if ft.lora_rank else "full fine-tune"
        pose = f", PoSE with {ft.train_length}-token windows" if ft.pose else ""
        if ft.short_fraction:
            pose += (
                f", {ft.short_fraction:.0%} of batches as episodes of at most "
                f"{pre.trained_length} tokens"
            )
        loss = "-" if s.get("final_loss") is None else f"{s['final_loss']:.4f}"
        lines.append(
            f"- **Fine-tune**: {kind}{pose}; {plural(ft.steps, 'step')} x "
            f"{plural(s['global_batch'], 'sequence')} of {s['train_length']} tokens; lr "
            f"{ft.lr:g}, {plural(s['warmup_steps'], 'warm-up step')}, "
            f"{ft.lr_schedule}, AdamW ({ft.adam_beta1}, {ft.adam_beta2}); final loss {loss}; "
            f"{s['tokens_per_s'] or 0:,.0f} tokens/s; data {s['data']['source']} "
            f"({s['data']['tokens']:,} tokens). Loss curve: "
            f"[{recipe.outputs.checkpoint}/loss.png]({recipe.outputs.checkpoint}/loss.png)."
        )
    if run.results is not None:
        cfg = run.results["config"]
        lines.append(
            f"- **Eval**: {', '.join(cfg['tasks'])} at {', '.join(map(str, cfg['lengths']))} "
            f"tokens on {run.results['data']['source']} "
            f"(fingerprint `{run.results['data']['fingerprint']}`), seed {cfg['seed']}."
        )
        lines += [f"- **Sliding window**: {line}." for line in sliding_window_lines(run.results)]
    if run.ckpt is not None:
        name = recipe.outputs.checkpoint
        lines.append(
            f"- **Checkpoint**: [`{name}/`]({name}/) with its model card "
            f"[`{name}/README.md`]({name}/README.md)."
        )
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in run.timings.items())
    lines += [f"- **Time**: {summary['seconds']:.1f}s ({timings}).", ""]
    if run.results is not None:
        proto = run.results.get("protocol", {}).get("ppl", {})
        if "ppl" in run.results["config"]["tasks"]:
            lines += ["## Perplexity (95% bootstrap interval over documents)", ""]
            if proto.get("description"):
                lines += [f"Protocol: {proto['description']}", ""]
            lines += [
                ppl_markdown(run.results),
                "",
                "![perplexity vs length](ppl_vs_length.png)",
                "",
            ]
        pk = passkey_markdown(run.results)
        if pk:
            lines += [
                "## Passkey retrieval (mean over depths)",
                "",
                pk,
                "",
                "![passkey](passkey_heatmap.png)",
                "",
            ]
        use = context_use_markdown(run.results)
        if use:
            lines += ["## Context use: does the model read its extended context?", "", use, ""]
            runs = run.results["runs"]
            if any(r.get("context_use") for r in runs):
                lines += ["![far-context gain](context_use.png)", ""]
            if any("retrieval" in r for r in runs):
                lines += ["![retrieval](retrieval_heatmap.png)", ""]
    versions = ", ".join(f"{k} {v}" for k, v in prov["versions"].items())
    lines += [
        "## Provenance",
        "",
        f"- Recipe: `recipe.yaml` (resolved; sha256 `{prov['recipe']['resolved_sha256'][:16]}`)"
        + (f", overrides `{' '.join(run.loaded.overrides)}`" if run.loaded.overrides else ""),
        f"- Seed {prov['seed']}; {versions}; Python {prov['python']}; "
        f"{prov['torch_threads']} torch threads.",
        f"- Base model config sha256 `{prov['models']['base']['config_sha256'][:16]}`"
        + (
            f"; output config sha256 `{prov['models']['output']['config_sha256'][:16]}`"
            if "output" in prov["models"]
            else ""
        )
        + ". Weight-file hashes are in `results.json` (provenance.models).",
        "",
        "Repeat: `ctxext run recipe.yaml --output-dir NEW_FOLDER`.",
        "",
    ]
    return "\n".join(lines)
