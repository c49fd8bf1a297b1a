"""Recipes: every shipped recipe validates; bad recipes exit 2 naming file, key and line;
overrides; `tiny-yarn` end to end; the same seed reproduces results.json's numbers exactly."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import BUNDLED, build_tiny_model, run_cli

from ctxext.errors import CtxextError
from ctxext.recipes import (
    RECIPES_DIR,
    Recipe,
    apply_overrides,
    load_recipe,
    parse_override,
    seeded,
    shipped_recipes,
    validate_recipe,
)

SHIPPED = sorted(shipped_recipes())


# --------------------------------------------------------------------------- shipped recipes


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


def test_recipes_list_and_show(capsys):
    code, out, _ = run_cli(capsys, "recipes", "list", "--json")
    assert code == 0
    names = [row["name"] for row in json.loads(out)]
    assert names == SHIPPED
    code, out, _ = run_cli(capsys, "recipes", "show", "tiny-yarn")
    assert code == 0 and "method: yarn" in out and "#" in out  # the file, with its comments
    code, out, _ = run_cli(capsys, "recipes", "show", "tiny-yarn", "--resolved", "seed=7")
    assert code == 0 and "seed: 7" in out and "lora_trainable" in out  # every default


# --------------------------------------------------------------------------- invalid recipes

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
            "expected 'linear', 'ntk', 'yarn', 'dynamic', 'llama3' or 'longrope'",
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


# --------------------------------------------------------------------------- overrides


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


def test_seeded_restores_the_callers_random_state():
    import numpy as np
    import torch

    random.seed(123)
    before = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(123)
    np.random.seed(None)
    with seeded(0):
        inside = (random.random(), np.random.rand(), torch.rand(1).item())
    with seeded(0):
        assert (random.random(), np.random.rand(), torch.rand(1).item()) == inside
    assert random.random() == before[0]
    assert not torch.are_deterministic_algorithms_enabled()


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def e2e_model(tmp_path_factory, tiny_tokenizer_dir) -> tuple[str, list[str]]:
    """The bundled model when it is installed, else a tiny Llama; overrides that shrink the
    tiny-yarn recipe to a few seconds (extend 2x, 2 fine-tune steps, 2 lengths, 2 documents)."""
    if (BUNDLED / "config.json").is_file():
        return "stdlib-llama", ["extend.factor=2", "eval.lengths=[256,512]"]
    path = build_tiny_model(tmp_path_factory.mktemp("e2e") / "tiny", tiny_tokenizer_dir)
    return str(path), ["extend.factor=2", "eval.lengths=[128,256]"]


def _numbers(results: dict) -> list:
    """Every measured number of results.json (no timings, dates or paths)."""
    return [
        (run["label"], run["variant"], run["ppl"], run.get("passkey"), run["config_sha256"])
        for run in results["runs"]
    ]


def test_tiny_yarn_end_to_end_and_reproducible(capsys, tmp_path, monkeypatch, e2e_model):
    from huggingface_hub import ModelCard

    model, shrink = e2e_model
    monkeypatch.chdir(tmp_path)
    overrides = [f"model={model}", *shrink, "finetune.steps=2", "finetune.warmup_steps=1"]
    overrides.append("eval.num_docs=2")
    code, out, err = run_cli(capsys, "run", "tiny-yarn", *overrides, "--output-dir", "run1")
    assert code == 0, err
    assert "perplexity" in out  # the results table
    run1 = tmp_path / "run1"
    names = {p.name for p in run1.iterdir()}
    assert {"recipe.yaml", "results.json", "results.csv", "ppl_vs_length.png", "report.md"} <= names
    assert "model" in names and not any(n.startswith(".") for n in names)
    assert not list(tmp_path.glob(".run1*"))  # the temporary sibling was renamed away

    # The resolved recipe validates and records the overrides' effect and every default.
    again = load_recipe(str(run1 / "recipe.yaml"))
    assert again.recipe.finetune.steps == 2 and again.recipe.extend.factor == 2.0
    assert again.recipe.output_dir == Path("run1")

    results = json.loads((run1 / "results.json").read_text())
    assert [r["variant"] for r in results["runs"]] == ["base", "extended", "finetuned"]
    prov = results["provenance"]
    assert {"ctxext", "transformers", "torch", "accelerate"} <= set(prov["versions"])
    assert prov["seed"] == 0
    assert len(prov["recipe"]["resolved_sha256"]) == 64
    assert prov["data"]["eval"]["fingerprint_sha256"] and prov["data"]["finetune"]
    weights = prov["models"]["output"]["weights_sha256"]
    assert weights and all(len(h) == 64 for h in weights.values())
    assert prov["models"]["base"]["config_sha256"] != prov["models"]["output"]["config_sha256"]
    assert prov["models"]["base"]["source"]["kind"] in ("bundled", "local")

    # The checkpoint is a plain extended HF checkpoint with a model card.
    config = json.loads((run1 / "model" / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "yarn"
    card = ModelCard.load(run1 / "model" / "README.md")
    assert card.data.base_model
    assert "ctxext" in card.data.tags and "yarn" in card.data.tags
    ppl = [r for r in card.data.eval_results if r.metric_type == "perplexity"]
    lengths = json.loads(json.dumps(results["config"]["lengths"]))
    assert len(ppl) == len(lengths)
    finetuned = results["runs"][2]["ppl"]
    assert ppl[0].metric_value == pytest.approx(finetuned[str(lengths[0])]["ppl"], rel=1e-4)

    report = (run1 / "report.md").read_text()
    assert "ppl_vs_length.png" in report and "model/README.md" in report
    assert all(r["label"] in report for r in results["runs"])

    # An existing output folder is refused without --overwrite (and left alone) ...
    code, _, err = run_cli(capsys, "run", "tiny-yarn", *overrides, "--output-dir", "run1")
    assert code == 2 and "--overwrite" in err
    # ... and the same recipe and seed reproduce every number exactly.
    code, _, err = run_cli(capsys, "run", "tiny-yarn", *overrides, "--output-dir", "run2")
    assert code == 0, err
    results2 = json.loads((tmp_path / "run2" / "results.json").read_text())
    assert _numbers(results2) == _numbers(results)
    prov2 = results2["provenance"]
    assert prov2["models"]["output"]["weights_sha256"] == weights
    assert prov2["recipe"]["resolved_sha256"] != prov["recipe"]["resolved_sha256"]  # output_dir
