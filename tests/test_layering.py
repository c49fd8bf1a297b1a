"""The data flows one way: lower modules never import the CLI, and rendering never imports the
recipe runner (the modelcard -> recipes -> modelcard cycle is gone)."""

from __future__ import annotations

import json
import subprocess
import sys

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
