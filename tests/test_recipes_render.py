"""ctxext.recipes.render: report.md names what was done, with the options of the method used
(and only those), and how to repeat the run."""

from __future__ import annotations

from ctxext.recipes.loader import load_recipe
from ctxext.recipes.provenance import provenance
from ctxext.recipes.render import render_report
from ctxext.recipes.runner import RecipeRun, RunHooks, preflight


def _report(tmp_path, overrides: list[str]) -> str:
    loaded = load_recipe("tiny-yarn", ["finetune=null", "eval=null", *overrides])
    run = RecipeRun(
        loaded, preflight(loaded.recipe), tmp_path, tmp_path / "o", None, RunHooks(), False, False
    )
    run.timings = {"extend": 0.3}
    return render_report(run, {"seconds": 0.5, "provenance": provenance(run)})


def test_report_states_the_extension_with_its_own_options(tmp_path):
    text = _report(tmp_path, ["extend.factor=4"])
    assert text.startswith("# ctxext run: tiny-yarn\n")
    assert (
        "- **Extend**: yarn, factor 4, beta_fast=32, beta_slow=1: 256 -> 1024 tokens "
        "(config rewrite; weights untouched)." in text
    )
    assert "low_freq_factor" not in text and "theta_multiplier" not in text  # other methods'
    assert "- **Time**: 0.5s (extend 0.3s)." in text
    assert "## Perplexity" not in text and "**Fine-tune**" not in text  # nothing measured
    assert text.endswith("Repeat: `ctxext run recipe.yaml --output-dir NEW_FOLDER`.\n")
    llama3 = _report(tmp_path, ["extend.method=llama3", "extend.beta_fast=32"])
    extend = next(line for line in llama3.splitlines() if line.startswith("- **Extend**"))
    assert extend.startswith(
        "- **Extend**: llama3, factor 8, low_freq_factor=1, high_freq_factor=4:"
    )
    assert "beta_fast" not in extend  # given, but not an option of llama3
