"""ctxext.recipes.loader: every shipped recipe is found and validates; bad recipes exit 2 naming
file, key and line; overrides are YAML values applied before validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

from ctxext.recipes.loader import (
    RECIPES_DIR,
    apply_overrides,
    load_recipe,
    parse_override,
    shipped_recipes,
    validate_recipe,
)

SHIPPED = sorted(shipped_recipes())


def test_the_shipped_recipes_are_all_there():
    assert {
        "tiny-yarn",
        "llama2-7b-yarn-64k",
        "llama2-7b-yarn-128k",
        "mistral-7b-yarn-64k",
        "mistral-7b-yarn-128k",
        "llama2-7b-pi-8k",
        "llama2-7b-pi-32k",
        "codellama-style-ntk",
        "llama31-style-llama3",
        "qwen25-7b-yarn-128k",
        "llama-7b-pose-32k",
    } <= set(SHIPPED)
    # The repository's top-level recipes/ is the package folder (pip ships the same files).
    top = Path(__file__).resolve().parents[1] / "recipes"
    assert top.resolve() == RECIPES_DIR.resolve()


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_validates(capsys, name):
    code, out, err = run_cli(capsys, "recipes", "validate", name)
    assert code == 0, err
    assert "valid" in out
    # ... by path too, and the resolved form (every default written out) validates again.
    code, _, err = run_cli(capsys, "recipes", "validate", RECIPES_DIR / f"{name}.yaml")
    assert code == 0, err
    loaded = load_recipe(name)
    again = validate_recipe(loaded.resolved(), "resolved")
    assert again == loaded.recipe


def test_recipes_list_and_show(capsys):
    code, out, _ = run_cli(capsys, "recipes", "list", "--json")
    assert code == 0
    names = [row["name"] for row in json.loads(out)]
    assert names == SHIPPED
    code, out, _ = run_cli(capsys, "recipes", "show", "tiny-yarn")
    assert code == 0 and "method: yarn" in out and "#" in out  # the file, with its comments
    code, out, _ = run_cli(capsys, "recipes", "show", "tiny-yarn", "--resolved", "seed=7")
    assert code == 0 and "seed: 7" in out and "lora_trainable" in out  # every default


BASE = "model: stdlib-llama\nextend:\n  method: yarn\n  factor: 8\n"

INVALID = {
    "unknown top-level key": (
        "modle: stdlib-llama\neval:\n  lengths: [256]\n",
        ["modle (line 1)", "unknown key", "expected one of: description, model"],
    ),
    "unknown nested key": (
        BASE + "  betafast: 16\n",
        ["extend.betafast (line 5)", "unknown key", "beta_fast"],
    ),
    "wrong type": (
        BASE + "finetune:\n  steps: ten\n",
        ["finetune.steps (line 6)", "expected a valid integer", "'ten'"],
    ),
    "unknown method": (
        "extend:\n  method: rope2x\n  factor: 2\n",
        [
            "extend.method (line 2)",
            "unknown method 'rope2x' (one of: linear, ntk, yarn, dynamic, llama3, longrope)",
        ],
    ),
    "bad list item": (
        BASE + "eval:\n  lengths:\n    - 256\n    - lots\n",
        ["eval.lengths.1 (line 8)", "expected a valid integer"],
    ),
    "bad value": (
        BASE + "finetune:\n  steps: 0\n",
        ["finetune.steps (line 6)", "positive integer"],
    ),
    "factor and target": (
        "extend:\n  method: yarn\n  factor: 2\n  target_length: 512\n",
        ["extend (line 1)", "exactly one of factor and target_length"],
    ),
    "compare needs finetune": (
        BASE + "eval:\n  lengths: [256]\n  compare: [base, finetuned]\n",
        ["eval.compare.1 (line 7)", "'finetuned' needs a finetune section"],
    ),
    "bad YAML": (
        BASE + "eval:\n  lengths: [256, 512\n",
        ["invalid YAML (line 7", "fix the file"],
    ),
    "duplicate key": (
        BASE + "seed: 1\nseed: 2\n",
        ["seed (line 6)", "duplicate key (first on line 5)"],
    ),
    "empty file": ("# nothing here\n", ["the recipe is empty", "expected a mapping"]),
    "not a mapping": ("- extend\n- eval\n", ["expected a mapping", "got a list"]),
    "checkpoint escapes output_dir": (
        BASE + "outputs:\n  checkpoint: ../escaped\n",
        ["outputs.checkpoint (line 6)", "inside output_dir", "'..'"],
    ),
    "absolute checkpoint": (
        BASE + "outputs:\n  checkpoint: /tmp/elsewhere\n",
        ["outputs.checkpoint (line 6)", "inside output_dir"],
    ),
    "report escapes output_dir": (
        BASE + "outputs:\n  report: sub/../../report.md\n",
        ["outputs.report (line 6)", "inside output_dir"],
    ),
    "report overwrites results": (
        BASE + "outputs:\n  report: results.json\n",
        ["outputs.report (line 6)", "every run writes"],
    ),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_recipes_exit_2_naming_file_key_and_line(capsys, tmp_path, monkeypatch, case):
    text, needles = INVALID[case]
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    for command in (["recipes", "validate", path], ["run", path, "--output-dir", "out"]):
        code, out, err = run_cli(capsys, *command)
        assert code == 2, (case, out, err)
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert str(path) in err, err
        for needle in needles:
            assert needle in err, (needle, err)
    assert not (tmp_path / "out").exists()  # nothing ran
    assert [p.name for p in tmp_path.iterdir()] == ["bad.yaml"]


def test_override_problems_name_the_override(capsys, tmp_path):
    cases = [
        (["finetune.stepz=3"], ["finetune.stepz", "from the override 'finetune.stepz=3'"]),
        (["finetune.steps"], ["must look like key.sub=value"]),
        (["eval.lengths=[256,"], ["not valid YAML"]),
        (["model.name=x"], ["model is a value, not a section"]),
        (["eval.lengths=[0]"], ["eval.lengths", "from the override"]),
    ]
    for overrides, needles in cases:
        code, _, err = run_cli(capsys, "recipes", "validate", "tiny-yarn", *overrides)
        assert code == 2, err
        for needle in needles:
            assert needle in err, (needle, err)


def test_unknown_recipe_name(capsys):
    code, _, err = run_cli(capsys, "run", "tiny-yarm")
    assert code == 2 and "tiny-yarn" in err and "recipes list" in err


def test_override_values_are_yaml():
    assert parse_override("finetune.steps=10") == (("finetune", "steps"), 10)
    assert parse_override("eval.lengths=[256, 512]") == (("eval", "lengths"), [256, 512])
    assert parse_override("finetune.lr=1e-4") == (("finetune", "lr"), "1e-4")  # YAML 1.1
    assert parse_override("finetune=null") == (("finetune",), None)
    assert parse_override("model=some/hub-id") == (("model",), "some/hub-id")


def test_overrides_apply_before_validation():
    loaded = load_recipe(
        "tiny-yarn",
        ["finetune.steps=6", "eval.lengths=[256,512]", "seed=5", "extend.factor=4"],
    )
    recipe = loaded.recipe
    assert recipe.finetune.steps == 6 and recipe.eval.lengths == [256, 512]
    assert recipe.extend.factor == 4.0
    # The recipe seed is the default seed of its sections.
    assert recipe.seed == recipe.finetune.seed == recipe.eval.seed == 5
    # A section can be removed, and its variant with it.
    recipe = load_recipe("tiny-yarn", ["finetune=null", "eval.compare=[base, extended]"]).recipe
    assert recipe.finetune is None and recipe.variants() == ["base", "extended"]
    data: dict = {}
    apply_overrides(data, ["eval.lengths=[256]", "eval.num_docs=2"])
    assert data == {"eval": {"lengths": [256], "num_docs": 2}}
