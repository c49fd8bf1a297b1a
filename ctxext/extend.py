"""`ctxext extend`: write a context-extended copy of a checkpoint without loading its weights.

Only three small JSON files change (config.json, tokenizer_config.json, generation_config.json);
weight files are hard-linked, so time and memory do not grow with the checkpoint's size.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctxext import checkpoint, locate, outputs, rope
from ctxext.config import ExtendConfig, ExtendJob


@dataclass
class ExtendPlan:
    """Everything `extend` will write, computed without touching the disk."""

    source: locate.ResolvedModel
    before: dict[str, Any]
    after: dict[str, Any]
    factor: float
    new_length: int
    diff: list[tuple[str, Any, Any]]
    tokenizer_config: dict[str, Any] | None = None
    generation_config: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def plan_extend(model: str | None, spec: ExtendConfig) -> ExtendPlan:
    """Resolve the model, read its config and compute the rewritten one (pure, no writes)."""
    source = locate.resolve_model(model)
    before = checkpoint.read_config(source.path)
    info = rope.analyze(before)
    factor = rope.validate_request(info, spec.method, spec.factor, spec.target_length)
    after = rope.extend_config(
        before, spec.method, factor=factor, target_length=None, **spec.rope_options()
    )
    new_length = rope.new_length(info.trained_length, factor)
    plan = ExtendPlan(
        source=source,
        before=before,
        after=after,
        factor=factor,
        new_length=new_length,
        diff=rope.config_diff(before, after),
    )
    plan.notes = engine_warnings(spec, info.trained_length, new_length)
    tok_path = source.path / "tokenizer_config.json"
    if tok_path.is_file():
        tok = checkpoint.read_json(tok_path, "")
        new_tok = dict(tok, model_max_length=new_length)
        plan.tokenizer_config = new_tok
        plan.diff += [
            (f"tokenizer_config.{k}", tok.get(k), v) for k, v in new_tok.items() if tok.get(k) != v
        ]
    gen_path = source.path / "generation_config.json"
    if gen_path.is_file():
        plan.generation_config = _generation_config(checkpoint.read_json(gen_path, ""), new_length)
    return plan


def engine_warnings(spec: ExtendConfig, trained: int, new: int) -> list[str]:
    """What other engines do differently with this request (:data:`rope.ENGINE_WARNINGS`)."""
    options = spec.rope_options()
    notes = []
    for key, text in rope.ENGINE_WARNINGS.items():
        method, names = (key, ()) if isinstance(key, str) else key
        changed = [n for n in names if options[n] != rope.OPTION_DEFAULTS[n]]
        if method == spec.method and (changed or not names):
            notes.append(text.format(trained=trained, new=new, changed=", ".join(changed)))
    return notes


def _generation_config(gen: dict[str, Any], new_length: int) -> dict[str, Any]:
    """A generation default `max_length` at the old context would silently cap generation."""
    gen = copy.deepcopy(gen)
    if isinstance(gen.get("max_length"), int) and gen["max_length"] < new_length:
        gen["max_length"] = new_length
    return gen


def write_extended(
    plan: ExtendPlan, job: ExtendJob, *, allow_pickle: bool = False
) -> dict[str, Any]:
    """Write the extended checkpoint atomically; returns the provenance record.

    A Hub model's weights are fetched only now (the plan needed its config alone), and only
    the files a loader needs reach the output (never ``original/``, GGUF or duplicate pickles).
    """
    out = outputs.check_output_path(job.output, [plan.source.path], job.overwrite)
    plan.source = locate.fetch(plan.source, "weights", allow_pickle=allow_pickle)
    started = time.time()
    with outputs.atomic_output(out) as tmp:
        record = write_checkpoint_files(plan, job, tmp)
    record["seconds"] = round(time.time() - started, 3)
    return record


def write_checkpoint_files(plan: ExtendPlan, job: ExtendJob, folder: Path) -> dict[str, Any]:
    """Fill ``folder`` (a temporary output being built) with the extended checkpoint."""
    skip = (*checkpoint.REWRITTEN_FILES, checkpoint.PROVENANCE_FILE)
    placed = outputs.link_model_files(
        plan.source.path, folder, job.link_mode, skip, only=plan.source.files
    )
    checkpoint.write_json(folder / "config.json", plan.after)
    if plan.tokenizer_config is not None:
        checkpoint.write_json(folder / "tokenizer_config.json", plan.tokenizer_config)
    if plan.generation_config is not None:
        checkpoint.write_json(folder / "generation_config.json", plan.generation_config)
    record = provenance(plan, job, placed)
    checkpoint.write_json(folder / checkpoint.PROVENANCE_FILE, record)
    return record


def provenance(plan: ExtendPlan, job: ExtendJob, placed: dict[str, str]) -> dict[str, Any]:
    """What was done, from what, with which versions: enough to reproduce or audit it."""
    return {
        "tool": "ctxext extend",
        "source": plan.source.record(),
        "method": job.extend.method,
        "factor": plan.factor,
        "trained_length": rope.analyze(plan.before).trained_length,
        "new_length": plan.new_length,
        "parameters": job.extend.model_dump(),
        "config_sha256_before": checkpoint.config_hash(plan.before),
        "config_sha256_after": checkpoint.config_hash(plan.after),
        "files": placed,
        "versions": checkpoint.versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def run_extend(job: ExtendJob) -> tuple[ExtendPlan, dict[str, Any]]:
    plan = plan_extend(job.model, job.extend)
    return plan, write_extended(plan, job)


__all__ = [
    "ExtendPlan",
    "engine_warnings",
    "plan_extend",
    "run_extend",
    "write_checkpoint_files",
    "write_extended",
]
