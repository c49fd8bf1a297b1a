"""One rule for the extended length: config, tokenizer, recipes and fine-tune agree."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from ctxext.rope import new_length


def test_new_length_rule():
    assert new_length(4096, 4.0) == 16384
    assert new_length(4096, 1.3) == 5325  # round(5324.8)
    assert new_length(256, 1.001) == 257  # round(256.256) = 256: never the trained length
    assert new_length(64, 1.5) == 96


@pytest.mark.parametrize("method", ["yarn", "ntk", "llama3", "linear", "dynamic"])
def test_extend_tokenizer_length_matches_the_config(capsys, tmp_path, method):
    """factor 1.001 at 256 tokens: 256.256 rounds down, the config says 257; so must the
    tokenizer (it said 256, below max_position_embeddings)."""
    out = tmp_path / "x"
    code, stdout, err = run_cli(capsys, "extend", "-o", out, "-m", method, "-f", "1.001", "--json")
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    tokenizer = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer["model_max_length"] == 257 == json.loads(stdout)["new_length"]
    # linear and dynamic keep the trained length in the config, as transformers needs
    assert config["max_position_embeddings"] == (256 if method in ("linear", "dynamic") else 257)


def test_recipe_and_finetune_setup_use_the_same_length(tmp_path):
    from ctxext.config import ExtendConfig, FinetuneConfig
    from ctxext.finetune.setup import setup_run
    from ctxext.recipes.loader import load_recipe
    from ctxext.recipes.runner import preflight

    path = tmp_path / "r.yaml"
    path.write_text("model: stdlib-llama\nextend: {method: yarn, factor: 1.001}\n")
    assert preflight(load_recipe(str(path)).recipe).new_length == 257
    spec = ExtendConfig(method="yarn", factor=1.001)
    setup = setup_run(None, tmp_path / "o", spec, FinetuneConfig(), resume=False, overwrite=False)
    assert setup.target_length == 257
