"""ctxext.recipes.runner: `tiny-yarn` end to end (outputs, provenance, model card, report); the
same seed reproduces results.json's numbers exactly; seeding restores the caller's state."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import BUNDLED, build_tiny_model, run_cli

from ctxext.recipes.loader import load_recipe
from ctxext.recipes.runner import seeded


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


@pytest.fixture(scope="module")
def e2e_model(tmp_path_factory, tiny_tokenizer_dir) -> tuple[str, list[str]]:
    """The bundled model when it is installed, else a tiny Llama; overrides that shrink the
    tiny-yarn recipe to a few seconds (extend 2x, 2 fine-tune steps, 2 lengths, 2 documents,
    1 retrieval key per length, form and depth at 2 depths: the recipe's 4 keys at 5 depths made
    retrieval most of the run)."""
    if (BUNDLED / "config.json").is_file():
        return "stdlib-llama", ["extend.factor=2", "eval.lengths=[256,512]"]
    path = build_tiny_model(tmp_path_factory.mktemp("e2e") / "tiny", tiny_tokenizer_dir)
    return str(path), ["extend.factor=2", "eval.lengths=[128,256]"]


def _numbers(results: dict) -> list:
    """Every measured number of results.json (no timings, dates or paths)."""
    return [
        (
            run["label"],
            run["variant"],
            run["ppl"],
            run.get("passkey"),
            run.get("context_use"),
            run.get("retrieval"),
            run["config_sha256"],
        )
        for run in results["runs"]
    ]


def test_tiny_yarn_end_to_end_and_reproducible(
    capsys, tmp_path, monkeypatch, e2e_model, calibrated
):  # calibrated: the recipe's pre-run check would measure the machine first
    from huggingface_hub import ModelCard

    model, shrink = e2e_model
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CTXEXT_PROGRESS_INTERVAL", "0")  # stderr is no terminal: lines
    overrides = [f"model={model}", *shrink, "finetune.steps=2", "finetune.warmup_steps=1"]
    # Two retrieval depths, not the recipe's five: the heatmap keeps two rows (each run
    # evaluates three variants, and the test runs the recipe twice).
    overrides += ["eval.num_docs=2", "eval.passkey_trials=1", "eval.passkey_depths=[0.25,0.75]"]
    code, out, err = run_cli(capsys, "run", "tiny-yarn", *overrides, "--output-dir", "run1")
    assert code == 0, err
    # Every long phase reports in a log: packing, the fine-tune's steps, each eval task.
    lines = err.splitlines()
    assert "packing stdlib: started" in err and "finetune: started (2 steps)" in lines
    assert any(line.startswith("finetune loss ") and "1/2 steps (50%)" in line for line in lines)
    for task in ("ppl", "context-use", "retrieval"):
        assert sum(f" {task}: done, " in line for line in lines) == 3, err  # 3 variants
    assert "perplexity" in out  # the results table
    # The terminal ends with the headline: far-context gain, retrieval, effective length.
    closing = out[out.index("what to look at") :]
    assert "far-context gain @" in closing and "retrieval (heldout" in closing
    assert "effective context length: reads to" in closing and out.rstrip().endswith("a length")
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
    # Every row is judged against the base model before fine-tuning, unscaled, at its trained
    # length: the base row's own retrieval, reused (the fine-tuned row is evaluated after the
    # fine-tune, in a second evaluation, and reuses it too).
    base = results["runs"][0]
    refs = [r["effective_length_detail"]["reference"] for r in results["runs"]]
    assert refs == [refs[0]] * 3 and refs[0]["length"] == base["trained_length"]
    assert refs[0]["source"] == (
        f"the row {base['model']}'s own retrieval at {base['trained_length']}, reused"
    )
    fams = [r["effective_length_detail"]["families"] for r in results["runs"]]
    assert all(
        {f: x["reference"] for f, x in fam.items()}
        == {f: x["reference"] for f, x in fams[0].items()}
        for fam in fams
    )
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

    # Context use (issue 15): every variant's effective context length, in results.json, the
    # report and the model card, with the far-context gain and the retrieval plots.
    from ctxext.report.cells import effective_length_line

    assert {"context_use.png", "retrieval_heatmap.png"} <= {p.name for p in run1.iterdir()}
    assert "context_use.png" in report and "retrieval_heatmap.png" in report
    card_text = (run1 / "model" / "README.md").read_text()
    for r in results["runs"]:
        assert "effective_length" in r and r["context_length"] in (128, 256, 512)
        line = effective_length_line(r)
        assert line.startswith(f"{r['label']}: extended to {r['context_length']}, reads to ")
        assert line in report and line in card_text

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


def test_a_task_source_that_cannot_fit_is_refused_before_any_evaluation(capsys, tmp_path):
    """The fine-tune's task episodes are checked in the run's preflight: a recipe whose
    multi-key episodes cannot fit is refused in one line before the base model is evaluated
    (it used to be refused after the base and extended evaluations, minutes in)."""
    code, _, err = run_cli(capsys, "run", "tiny-yarn", "finetune.tasks.min_length=128",
                           "--output-dir", str(tmp_path / "out"))  # fmt: skip
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "does not fit --task-min-length 128" in lines[0], err
    assert not (tmp_path / "out").exists()


def test_short_batches_that_cannot_be_built_are_refused_before_any_evaluation(capsys, tmp_path):
    """finetune.short_fraction is checked in the run's preflight too: a training length that is
    not past the trained one is refused in one line before the base model is evaluated."""
    code, _, err = run_cli(capsys, "run", "tiny-yarn", "extend.keep_short=true",
                           "finetune.short_fraction=0.5", "finetune.train_length=256",
                           "--output-dir", str(tmp_path / "out"))  # fmt: skip
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--short-fraction" in lines[0] and "not longer" in lines[0], err
    assert not (tmp_path / "out").exists()


def test_a_reference_model_that_does_not_exist_is_refused_before_any_evaluation(capsys, tmp_path):
    """eval.reference_model is resolved in the run's preflight: a bad one is refused in one
    line before the base model is evaluated (not at the first evaluation)."""
    missing = tmp_path / "no-such-model"
    code, _, err = run_cli(capsys, "run", "tiny-yarn", f"eval.reference_model={missing}",
                           "--output-dir", str(tmp_path / "out"))  # fmt: skip
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0] and str(missing) in lines[0], err
    assert not (tmp_path / "out").exists()
