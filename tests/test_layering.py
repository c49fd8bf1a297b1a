"""The data flows one way: lower modules (the eval pipeline, evalrun, included) never import the
CLI, the CLI's modules import no torch at import time, and rendering never imports the recipe
runner (the modelcard -> recipes -> modelcard cycle is gone)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

LOWER = [
    "ctxext.budget",
    "ctxext.calibrate", "ctxext.checkpoint", "ctxext.config", "ctxext.context_use",
    "ctxext.corpus", "ctxext.data", "ctxext.evalrun", "ctxext.evaluate",
    "ctxext.evaluate.loss", "ctxext.evaluate.passkey", "ctxext.evaluate.perplexity",
    "ctxext.evaluate.protocol", "ctxext.extend",
    "ctxext.finetune", "ctxext.fsdp", "ctxext.inspect", "ctxext.modelcard", "ctxext.modeling",
    "ctxext.plan", "ctxext.recipes", "ctxext.report", "ctxext.rope", "ctxext.rope.formulas",
    "ctxext.rope.methods", "ctxext.rope.read", "ctxext.rope.write",
    "ctxext.tune", "ctxext.tune.leaderboard", "ctxext.tune.run", "ctxext.tune.search",
]  # fmt: skip
#: The command line: one module per command, plus the app, shared options and progress bars.
CLI = [
    "ctxext.cli", "ctxext.cli.app", "ctxext.cli.eval", "ctxext.cli.extend",
    "ctxext.cli.finetune", "ctxext.cli.inspect", "ctxext.cli.options", "ctxext.cli.plan",
    "ctxext.cli.progress", "ctxext.cli.recipes", "ctxext.cli.tune",
]  # fmt: skip


def _loaded_after_importing(modules: list[str], prefix: str = "ctxext") -> list[str]:
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({prefix!r}))))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.parametrize("module", LOWER)
def test_lower_modules_never_import_the_cli(module):
    # Each alone, in a fresh interpreter: one module's import cannot hide another's.
    loaded = _loaded_after_importing([module])
    assert module in loaded
    assert not [m for m in loaded if m.startswith("ctxext.cli")], loaded


@pytest.mark.parametrize("module", CLI)
def test_cli_modules_import_alone_without_torch(module):
    # `ctxext --help` stays instant: the commands import torch / transformers when they run.
    loaded = _loaded_after_importing([module], prefix="")
    heavy = [m for m in loaded if m.split(".")[0] in ("torch", "transformers", "numpy")]
    assert module in loaded and not heavy, heavy


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
