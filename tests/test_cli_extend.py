"""`ctxext extend` (ctxext/cli/extend.py): refused models and arguments, each one line with exit
code 2 and nothing written; partial rotary models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli, tree_hash


def _write_config(path: Path, config: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


REFUSED_CONFIGS = {
    "gpt2 (learned)": ({"model_type": "gpt2", "n_positions": 1024}, "learned"),
    "opt (learned)": ({"model_type": "opt", "max_position_embeddings": 2048}, "learned"),
    "bloom (alibi)": ({"model_type": "bloom"}, "alibi"),
    "mpt (alibi)": ({"model_type": "mpt", "max_seq_len": 2048}, "alibi"),
    "falcon alibi": ({"model_type": "falcon", "alibi": True}, "alibi"),
    "gptj rotary_dim": (
        {"model_type": "gptj", "rotary_dim": 64, "n_positions": 2048},
        "rotary_dim",
    ),
    "already scaled": (
        {
            "model_type": "llama",
            "hidden_size": 64,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
            "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        },
        "already",
    ),
}


@pytest.mark.parametrize("name", list(REFUSED_CONFIGS))
def test_refused_models(capsys, tmp_path, name):
    config, word = REFUSED_CONFIGS[name]
    src = _write_config(tmp_path / "m", config)
    before = tree_hash(src)
    code, _, err = run_cli(capsys, "extend", src, "-o", tmp_path / "o", "-m", "yarn", "-f", "2")
    assert code == 2, err
    assert err.count("\n") == 1 and word in err.lower() and "Traceback" not in err
    assert tree_hash(src) == before and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "word"),
    [
        (["-m", "yarn", "-f", "1"], "factor"),
        (["-m", "yarn", "-f", "0.5"], "factor"),
        (["-m", "yarn", "-f", "-2"], "factor"),
        (["-m", "yarn", "-f", "nan"], "factor"),
        (["-m", "yarn", "-f", "abc"], "factor"),
        (["-m", "yarn", "-t", "64"], "trained"),
        (["-m", "yarn", "-t", "128"], "trained"),
        (["-m", "rope9000", "-f", "2"], "method"),
        (["-m", "yarn"], "factor"),
        (["-m", "yarn", "-f", "2", "-t", "256"], "exactly one"),
    ],
)
def test_bad_arguments(capsys, tmp_path, tiny_llama, args, word):
    before = tree_hash(tiny_llama)
    code, _, err = run_cli(capsys, "extend", tiny_llama, "-o", tmp_path / "o", *args)
    assert code == 2, err
    assert err.count("\n") == 1 and word in err.lower(), err
    assert tree_hash(tiny_llama) == before and not (tmp_path / "o").exists()


def test_output_inside_input_refused(capsys, tiny_llama):
    before = tree_hash(tiny_llama)
    code, _, err = run_cli(
        capsys, "extend", tiny_llama, "-o", tiny_llama / "sub", "-m", "yarn", "-f", "2"
    )
    assert code == 2 and "inside the input" in err
    assert tree_hash(tiny_llama) == before


# Partial rotary (gpt_neox, phi, stablelm, persimmon) through inspect and extend, with the
# rotary frequencies checked: tests/test_arch_matrix.py.


WARNS = {  # extend arguments: words its one warning line must hold (None: no warning)
    ("-m", "dynamic"): ("llama.cpp ignores it", "GGUF", "128-token context", "vLLM", "512", "TGI"),
    ("-m", "yarn", "--beta-fast", "16"): ("llama.cpp (Llama models) and TGI ignore beta_fast:",),
    ("-m", "yarn", "--attention-factor", "1"): ("ignore attention_factor:", "0.1 ln s + 1"),
    ("-m", "yarn"): None,
    ("-m", "yarn", "--beta-fast", "32"): None,  # the default, spelt out
    ("-m", "linear"): None,
    ("-m", "ntk"): None,
    ("-m", "llama3"): None,
}


@pytest.mark.parametrize("args", list(WARNS), ids=" ".join)
def test_extend_warns_what_other_engines_ignore(capsys, tmp_path, tiny_llama, args):
    out_dir = tmp_path / "o"
    code, out, err = run_cli(
        capsys, "extend", tiny_llama, "-o", out_dir, *args, "-f", "4", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["method"] == args[1]  # the warning stays off stdout
    warnings = [line for line in err.splitlines() if "warning" in line.lower()]
    if WARNS[args] is None:
        assert warnings == []
        return
    (line,) = warnings  # one line naming each engine that does not run it as transformers does
    assert line.startswith("warning: ")
    for words in WARNS[args]:
        assert words in line, words
    code, _, err = run_cli(capsys, "extend", tiny_llama, "-o", out_dir, *args, "-f", "4")
    assert code == 2 and "warning" not in err  # a refused request says only why


def test_finetune_and_run_warn_as_extend_does(capsys, tmp_path, tiny_llama_session):
    """`finetune -m dynamic` and `run` (extend alone, or extend + fine-tune) print the line
    `extend -m dynamic` prints about llama.cpp, vLLM and TGI: once, on stderr, also with --json."""
    args = ("-m", "dynamic", "-f", "4")
    code, _, err = run_cli(capsys, "extend", tiny_llama_session, "-o", tmp_path / "e", *args)
    assert code == 0, err
    (said,) = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert "llama.cpp ignores it" in said
    short = ["--steps", "1", "--warmup-steps", "0", "--save-every", "0", "--train-length", "64"]
    code, _, err = run_cli(
        capsys, "finetune", tiny_llama_session, "-o", tmp_path / "f", *args, *short, "--json"
    )
    assert code == 0, err
    assert [line for line in err.splitlines() if line.startswith("warning: ")] == [said]
    finetune = "finetune: {steps: 1, warmup_steps: 0, save_every: 0, train_length: 64}\n"
    for name, section, flags in [("extend", "", ["--json"]), ("finetune", finetune, [])]:
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(
            f"model: {tiny_llama_session}\nextend: {{method: dynamic, factor: 4}}\n{section}"
        )
        code, _, err = run_cli(capsys, "run", recipe, "-o", tmp_path / f"run-{name}", *flags)
        assert code == 0, err
        lines = err.splitlines()
        assert said in lines and sum("llama.cpp" in line for line in lines) == 1, (name, err)
