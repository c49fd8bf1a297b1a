"""ctxext.recipes.provenance: a run records the hashes of its recipe and of the models it read;
weight files are hashed once per inode (hard-linked checkpoints are not read twice)."""

from __future__ import annotations

import hashlib
import os

from ctxext import checkpoint, locate
from ctxext.recipes import provenance as prov_module
from ctxext.recipes.loader import load_recipe
from ctxext.recipes.provenance import provenance
from ctxext.recipes.runner import RecipeRun, RunHooks, preflight


def test_provenance_hashes_the_recipe_and_the_base_model(tmp_path):
    loaded = load_recipe("tiny-yarn", ["finetune=null", "eval=null", "seed=3"])
    pre = preflight(loaded.recipe)
    run = RecipeRun(loaded, pre, tmp_path, tmp_path / "out", None, RunHooks(), False, False)
    prov = provenance(run)
    recipe = prov["recipe"]
    assert recipe["file_sha256"] == hashlib.sha256(loaded.path.read_bytes()).hexdigest()
    assert recipe["resolved_sha256"] == checkpoint.config_hash(loaded.resolved())
    assert recipe["overrides"] == ["finetune=null", "eval=null", "seed=3"] and prov["seed"] == 3
    base = prov["models"]["base"]
    weights = locate.bundled_path() / "model.safetensors"
    assert base["weights_sha256"] == {"model.safetensors": checkpoint.file_sha256(weights)}
    assert base["config_sha256"] == checkpoint.config_hash(checkpoint.read_config(weights.parent))
    assert "output" not in prov["models"] and prov["data"] == {}  # nothing written or read yet


def test_weight_hashes_are_cached_by_inode(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"weights" * 1000)
    os.link(a, b)
    before = len(prov_module._HASH_CACHE)
    expected = hashlib.sha256(a.read_bytes()).hexdigest()
    assert prov_module._sha256_file(a) == prov_module._sha256_file(b) == expected
    assert len(prov_module._HASH_CACHE) == before + 1  # one inode, hashed once
    a.unlink()
    a.write_bytes(b"other weights")  # a new file (new inode, size): hashed again
    assert prov_module._sha256_file(a) == hashlib.sha256(b"other weights").hexdigest()
