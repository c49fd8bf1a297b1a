"""ctxext.recipes.schema: the published setups' numbers, the default variants."""

from __future__ import annotations

import pytest

from ctxext.errors import CtxextError
from ctxext.recipes.loader import RECIPES_DIR, load_recipe, validate_recipe
from ctxext.recipes.schema import Recipe


def test_published_setups_carry_the_papers_numbers():
    """The reproduction recipes state their source and the published figures as comments."""
    text = (RECIPES_DIR / "llama2-7b-yarn-64k.yaml").read_text()
    assert "2.42" in text and "lr: 2.0e-5" in text and "steps: 400" in text
    ntk = load_recipe("codellama-style-ntk").recipe.extend
    assert ntk is not None and ntk.method == "ntk"
    theta = 1e4 * ntk.factor ** (128 / 126)  # ntk: theta' = theta * s^(d/(d-2)), d = 128
    assert theta == pytest.approx(1e6, rel=1e-12)
    llama3 = load_recipe("llama31-style-llama3").recipe.extend
    assert (llama3.factor, llama3.low_freq_factor, llama3.high_freq_factor) == (8.0, 1.0, 4.0)
    pose = load_recipe("llama-7b-pose-32k").recipe.finetune
    assert pose.pose and pose.train_length == 2048


def test_default_variants_follow_the_sections():
    recipe = Recipe.model_validate(
        {"extend": {"method": "yarn", "factor": 2}, "eval": {"lengths": [256]}}
    )
    assert recipe.variants() == ["base", "extended"]
    recipe = Recipe.model_validate(
        {"eval": {"lengths": [256], "compare": ["base", "ntk"]}}
        | {"extend": {"method": "yarn", "factor": 2}}
    )
    assert recipe.variants() == ["base", "ntk"]
    with pytest.raises(CtxextError, match="extend factor"):
        validate_recipe({"eval": {"lengths": [256], "compare": ["linear"]}}, "r.yaml")


def test_a_recipe_mix_in_any_written_form_resolves_to_one_and_round_trips(tmp_path):
    import yaml

    forms = [
        "mix: [stdlib:0.6, multikey:0.4]",
        "mix: {stdlib: 0.6, multikey: 0.4}",
        "mix:\n    - {source: stdlib, weight: 0.6}\n    - {source: multikey, weight: 0.4}",
    ]
    resolved = []
    for i, form in enumerate(forms):
        path = tmp_path / f"r{i}.yaml"
        path.write_text(
            "extend: {method: yarn, factor: 2}\n"
            f"finetune:\n  steps: 3\n  loss: longce\n  tasks: {{keys: 3}}\n  {form}\n"
        )
        loaded = load_recipe(str(path))
        resolved.append(loaded.resolved())
        assert "LongCE, mix stdlib 0.6 + multikey 0.4" in loaded.recipe.summary()
    assert resolved[0] == resolved[1] == resolved[2]
    assert resolved[0]["finetune"]["mix"] == [
        {"source": "stdlib", "weight": 0.6},
        {"source": "multikey", "weight": 0.4},
    ]
    # What recipe.yaml records reads back as the same recipe.
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(resolved[0]))
    assert load_recipe(str(again)).resolved() == resolved[0]
    with pytest.raises(CtxextError, match=r"finetune\.mix.*sum to 0"):
        validate_recipe({"finetune": {"mix": ["stdlib:0"]}}, "r.yaml")
