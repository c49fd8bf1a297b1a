"""The data flows one way: lower modules never import the CLI, and rendering never imports the
recipe runner (the modelcard -> recipes -> modelcard cycle is gone)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

LOWER = [
    "ctxext.calibrate", "ctxext.checkpoint", "ctxext.config", "ctxext.context_use",
    "ctxext.corpus", "ctxext.data", "ctxext.evalrun", "ctxext.evaluate",
    "ctxext.evaluate.loss", "ctxext.evaluate.passkey", "ctxext.evaluate.perplexity",
    "ctxext.evaluate.protocol", "ctxext.extend",
    "ctxext.finetune", "ctxext.fsdp", "ctxext.inspect", "ctxext.modelcard", "ctxext.modeling",
    "ctxext.plan", "ctxext.recipes", "ctxext.report", "ctxext.rope", "ctxext.rope.formulas",
    "ctxext.rope.methods", "ctxext.rope.read", "ctxext.rope.write",
    "ctxext.tune", "ctxext.tune.leaderboard", "ctxext.tune.run", "ctxext.tune.search",
]  # fmt: skip


def _loaded_after_importing(modules: list[str]) -> list[str]:
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('ctxext'))))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_lower_modules_never_import_the_cli():
    loaded = _loaded_after_importing(LOWER)
    assert set(LOWER) <= set(loaded)
    assert not [m for m in loaded if m.startswith("ctxext.cli")], loaded


def test_rendering_does_not_import_the_recipe_runner():
    loaded = _loaded_after_importing(["ctxext.report", "ctxext.modelcard"])
    assert "ctxext.recipes" not in loaded and "ctxext.finetune" not in loaded, loaded


#: Packages split from one module each (issue 17): every module must import first and alone
#: (a cycle inside a package shows only when one of its submodules is imported first).
SPLIT = [
    "ctxext.evaluate.loss", "ctxext.evaluate.passkey", "ctxext.evaluate.perplexity",
    "ctxext.evaluate.protocol", "ctxext.rope.formulas", "ctxext.rope.methods", "ctxext.rope.read",
    "ctxext.rope.write", "ctxext.tune.leaderboard", "ctxext.tune.run", "ctxext.tune.search",
]  # fmt: skip


@pytest.mark.parametrize("module", SPLIT)
def test_each_split_module_imports_alone(module):
    loaded = _loaded_after_importing([module])
    assert module in loaded
    assert not [m for m in loaded if m.startswith("ctxext.cli")], loaded


def test_rope_and_the_schemas_load_without_numpy_or_torch():
    """`extend` rewrites a config only: reading and writing one loads neither numpy nor torch
    (the float64 formulas load on use, for NTK's theta and `inspect`)."""
    code = (
        "import sys, ctxext.config, ctxext.rope\n"
        "print(sorted(m for m in ('numpy', 'torch') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
