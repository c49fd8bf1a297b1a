"""Every shipped recipe runs, torchtune-style: the recipe as shipped, with overrides that point
it at the bundled model and local data and shrink it to one step and short lengths.

What is held as shipped: the extension (method, factor or target length, options), the
fine-tune kind (full / LoRA, PoSE, gradient checkpointing, schedule), the eval tasks and the
variant list (another checkpoint in ``compare`` becomes a local tiny model). So the PoSE, full
fine-tune, linear, ntk, yarn and llama3 writers, passkey and compare-with-another-model paths
all execute. What is overridden: model, data, steps (1), warm-up (0), batch (1 x 1),
sequence and eval lengths (128 / 224,256), documents (2), passkey trials (1, one depth).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

from ctxext.recipes.loader import load_recipe, shipped_recipes
from ctxext.recipes.schema import VARIANT_WORDS

SHIPPED = sorted(shipped_recipes())
# Finetuning recipes take a few seconds more than config-only ones: marked slow, still in CI.
SLOW = [name for name in SHIPPED if load_recipe(name).recipe.finetune is not None]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(calibration, tmp_path_factory):
    """A model this small gains nothing from threads, and on a busy machine OpenMP threads
    waiting for each other make each forward pass many times slower.

    The recipes' pre-run check would measure the machine at 1 thread (~30 s, a calibration is
    kept per thread count): the session's measurement stands in for it. These tests check what
    the runs write, not the estimates."""
    import torch

    from ctxext.resources import calibrate

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CTXEXT_CACHE_DIR", str(tmp_path_factory.mktemp("calibration-1-thread")))
        calibrate.save_calibration(calibration)
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    from ctxext.corpus import stdlib_documents

    docs = [d.text for d in stdlib_documents("heldout") if len(d.text) > 4000][:3]
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return path


def _overrides(name: str, data: Path, other: Path) -> list[str]:
    recipe = load_recipe(name).recipe
    out = [
        "model=stdlib-llama",
        f"eval.data={data}",
        "eval.lengths=[224,256]",  # the other (tiny) model needs 195 for passkey
        "eval.num_docs=2",
        "eval.passkey_trials=1",
        "eval.passkey_depths=[0.5]",
    ]
    if recipe.finetune is not None:
        out += [
            "finetune.steps=1",
            "finetune.warmup_steps=0",
            "finetune.batch_size=1",
            "finetune.grad_accum=1",
            "finetune.train_length=128",
            "finetune.save_every=0",
            "finetune.text_field=text",
        ]
        # A recipe with a data mix keeps one (its text source replaced by the test's data).
        if recipe.finetune.mix is not None:
            out.append(f"finetune.mix=[{data}:0.7,retrieval:0.3]")
            if recipe.finetune.tasks.min_length is not None:  # episodes within 128 tokens
                out.append("finetune.tasks.min_length=64")
        else:
            out.append(f"finetune.data={data}")
    methods = {"linear", "ntk", "yarn", "dynamic", "llama3"}
    compare = [v if v in VARIANT_WORDS or v in methods else str(other) for v in recipe.variants()]
    return [*out, f"eval.compare=[{','.join(compare)}]"]


def _check_run(name: str, out: Path, other: Path) -> None:
    recipe = load_recipe(name).recipe
    results = json.loads((out / "results.json").read_text())
    variants = [r["variant"] for r in results["runs"]]
    shipped = recipe.variants()
    assert len(variants) == len(shipped)
    for got, want in zip(variants, shipped, strict=True):
        assert got == want or (want not in VARIANT_WORDS and got == str(other)), (got, want)
    for run in results["runs"]:
        # the other checkpoint (trained at 128) really is what its row measured
        other_row = run["variant"] not in VARIANT_WORDS
        assert run["trained_length"] == (128 if other_row else 256)
        assert set(run["ppl"]) == {"224", "256"}
        assert all(r["n_tokens"] > 0 for r in run["ppl"].values())
        if "passkey" in recipe.eval.tasks:
            assert run["passkey"]["lengths"] == [224, 256]
    config = json.loads((out / "model" / "config.json").read_text())
    spec = recipe.extend
    rope_type = "default" if spec.method == "ntk" else spec.method
    assert config["rope_parameters"]["rope_type"] == rope_type
    if spec.factor is not None and spec.method != "ntk":
        assert config["rope_parameters"]["factor"] == pytest.approx(spec.factor)
    assert (out / "report.md").is_file() and (out / "model" / "README.md").is_file()
    if recipe.finetune is not None:
        prov = json.loads((out / "model" / "ctxext_provenance.json").read_text())
        assert prov["finetune"]["pose"] == recipe.finetune.pose
        assert prov["finetune"]["grad_ckpt"] == recipe.finetune.grad_ckpt
        assert prov["training"]["steps"] == 1
        assert (out / "model" / "loss.png").is_file()


def _run(capsys, tmp_path: Path, name: str, data: Path, other: Path) -> None:
    out = tmp_path / "run"
    code, _, err = run_cli(
        capsys, "run", name, *_overrides(name, data, other), "--output-dir", out, "--json"
    )
    assert code == 0, err
    _check_run(name, out, other)


@pytest.mark.parametrize("name", [n for n in SHIPPED if n not in SLOW])
def test_config_only_recipe_runs(capsys, tmp_path, data_file, tiny_llama_session, name):
    _run(capsys, tmp_path, name, data_file, tiny_llama_session)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_finetuning_recipe_runs(capsys, tmp_path, data_file, tiny_llama_session, name):
    _run(capsys, tmp_path, name, data_file, tiny_llama_session)


def test_every_shipped_recipe_is_covered():
    assert len(SHIPPED) == 11
    kinds = {load_recipe(n).recipe.extend.method for n in SHIPPED}
    assert kinds == {"linear", "ntk", "yarn", "llama3"}
