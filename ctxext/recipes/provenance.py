"""What a recipe run records about itself: versions, seed, data fingerprints and the hashes
of every model it read or wrote; and the plain data its model card is written from."""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path
from typing import Any

from ctxext.recipes.record import RunRecord

_HASH_CACHE: dict[tuple[int, int, int, int], str] = {}


def _sha256_file(path: Path) -> str:
    """sha256 of a file, cached by inode (hard-linked weights are hashed once)."""
    from ctxext import checkpoint

    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = checkpoint.file_sha256(path)
    return _HASH_CACHE[key]


def _model_hashes(folder: Path) -> dict[str, Any]:
    from ctxext import checkpoint

    config = checkpoint.read_config(folder)
    return {
        "config_sha256": checkpoint.config_hash(config),
        "weights_sha256": {
            p.relative_to(folder).as_posix(): _sha256_file(p)
            for p in checkpoint.weight_files(folder)
        },
    }


def provenance(run: RunRecord) -> dict[str, Any]:
    """Versions, seed and hashes: enough to tell whether two runs can be compared."""
    import torch

    from ctxext import checkpoint
    from ctxext.resources import threads

    recipe_text = run.loaded.path.read_bytes()
    resolved = run.loaded.resolved()
    data: dict[str, Any] = {}
    if run.results is not None:
        data["eval"] = {
            "source": run.results["data"]["source"],
            "fingerprint_sha256": run.results["data"]["fingerprint"],
            "n_documents": run.results["data"]["n_documents"],
        }
    if run.finetune_summary is not None:
        ft = run.finetune_summary["data"]
        data["finetune"] = {
            "source": ft["source"],
            "fingerprint_sha256": ft["fingerprint"],
            "documents": ft["documents"],
            "tokens": ft["tokens"],
        }
        if "mix" in ft:  # the sources, weights, draws and task parameters
            data["finetune"]["mix"] = ft["mix"]
    models = {
        "base": {
            "model": run.pre.name,
            "source": run.pre.source.record(),  # for a Hub model: repo, revision and commit
            **_model_hashes(run.pre.source.path),
        }
    }
    if run.ckpt is not None and run.ckpt_ready():
        models["output"] = {
            "folder": run.recipe.outputs.checkpoint,
            **_model_hashes(run.ckpt),
        }
    return {
        "recipe": {
            "name": run.loaded.name,
            "file": str(run.loaded.path),
            "shipped": run.loaded.shipped,
            "file_sha256": hashlib.sha256(recipe_text).hexdigest(),
            "overrides": run.loaded.overrides,
            "resolved": resolved,
            "resolved_sha256": checkpoint.config_hash(resolved),
        },
        "seed": run.recipe.seed,
        "versions": checkpoint.versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "openmp": threads.policy(),  # how the threads wait (ctxext.resources.threads)
        "deterministic_algorithms": True,
        "data": data,
        "models": models,
        "timings_s": run.timings,
    }


def card_info(run: RunRecord, provenance: dict[str, Any]) -> dict[str, Any]:
    """What the model card needs, as plain data (see :mod:`ctxext.modelcard`)."""
    recipe, pre = run.recipe, run.pre
    own = "finetuned" if recipe.finetune is not None else "extended"
    runs = (run.results or {}).get("runs", [])
    return {
        # The Hub id, or the name of a bundled/local model (a local path is no metadata).
        "base_model": recipe.model if pre.source.source == "hub-cache" else pre.name,
        "base_is_hub": pre.source.source == "hub-cache",
        "model_name": f"{pre.name}-{recipe.extend.method}-{pre.new_length}"
        if recipe.extend and pre.new_length
        else f"{pre.name}-{run.loaded.name}",
        "recipe_name": run.loaded.name,
        "description": recipe.description,
        "extend": recipe.extend.model_dump(mode="json") if recipe.extend else None,
        "factor": pre.factor,
        "trained_length": pre.trained_length,
        "new_length": pre.new_length,
        "finetune": recipe.finetune.model_dump(mode="json") if recipe.finetune else None,
        "finetune_summary": run.finetune_summary,
        "results": run.results,
        "own_variant": own,
        "own_runs": [r for r in runs if r.get("variant") == own],
        "provenance": provenance,
    }
