"""ctxext.tune.leaderboard: rows, ranking against paper YaRN, the recipe of the winner; and the
leaderboard's Markdown table (ctxext.report)."""

from __future__ import annotations

import pytest
import yaml

from ctxext.report.markdown import leaderboard_markdown
from ctxext.tune.leaderboard import leaderboard_candidates, ranked_rows, recipe_snippet
from ctxext.tune.search import Candidate, Trial


def _run(label: str, at_trained: float, at_target: float) -> dict:
    def ppl(value: float) -> dict:
        return {"ppl": value, "ci_low": value - 1.0, "ci_high": value + 1.0}

    return {"label": label, "ppl": {"128": ppl(at_trained), "256": ppl(at_target)}}


def test_rows_are_base_every_paper_default_and_every_tuned_best():
    best = {"yarn": Trial(Candidate("yarn", (("beta_fast", 8.0),), "random"))}
    rows = leaderboard_candidates(best)
    assert [label for label, _ in rows] == [
        "base (unscaled)", "linear (paper default)", "ntk (paper default)",
        "yarn (paper default)", "dynamic (paper default)", "llama3 (paper default)",
        "yarn (tuned)",
    ]  # fmt: skip
    assert rows[0][1] is None and rows[-1][1] is best["yarn"].candidate


def test_ranked_by_target_perplexity_relative_to_paper_yarn():
    runs = [
        _run("base (unscaled)", 10.0, 80.0),
        _run("yarn (paper default)", 10.5, 20.0),
        _run("yarn (tuned)", 10.4, 15.0),
    ]
    lines = ranked_rows(runs, target=256, trained=128)
    assert [r["label"] for r in lines] == [
        "yarn (tuned)",
        "yarn (paper default)",
        "base (unscaled)",
    ]
    assert [r["vs_paper_yarn"] for r in lines] == pytest.approx([-0.25, 0.0, 3.0])
    assert lines[0]["ci_target"] == [14.0, 16.0] and lines[0]["ppl_trained"] == 10.4
    table = leaderboard_markdown(lines, target=256, trained=128).splitlines()
    assert table[0].startswith("| rank | configuration | ppl @ 128 | ppl @ 256 (95% CI)")
    assert table[2] == "| 1 | yarn (tuned) | 10.40 | 15.00 (14.00-16.00) | -25.0% |"
    assert len(table) == 2 + len(lines)


def test_recipe_snippet_keeps_only_what_differs_from_the_defaults():
    result = {
        "config": {"seed": 3, "target_length": 256},
        "model": {"name": "tiny"},
        "chosen": {"extend": Candidate("yarn", (("beta_fast", 8.0),)).spec(256).model_dump()},
        "leaderboard": [{"ppl_target": 15.0}],
    }
    text = recipe_snippet(result)
    assert text.startswith("# written by ctxext tune (seed 3)")
    assert yaml.safe_load(text) == {
        "model": "tiny",
        "extend": {"method": "yarn", "target_length": 256, "beta_fast": 8.0},
    }
