"""CLI behaviour: help, version, one-line refusals with exit code 2, --debug tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import build_tiny_model, run_cli, tree_hash


def test_version_and_help(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.startswith("ctxext ")
    for cmd in ("extend", "inspect"):
        code, out, _ = run_cli(capsys, cmd, "--help")
        assert code == 0 and "Usage" in out


def test_help_is_fast_and_imports_no_torch():
    code = "import sys; from ctxext.cli.app import app; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


def test_single_command_app_parses_like_the_full_app():
    # main() builds only the command argv names (start-up time); it must be the same command.
    from typer.main import get_command

    from ctxext.cli.app import _app_for, app

    full = get_command(app)
    for name in ("extend", "inspect", "eval", "finetune", "run"):
        single = get_command(_app_for([name, "--help"]))
        assert list(single.commands) == [name]
        mine, theirs = single.commands[name], full.commands[name]
        assert [p.opts for p in mine.params] == [p.opts for p in theirs.params]
        assert [p.default for p in mine.params] == [p.default for p in theirs.params]
        assert mine.help == theirs.help
    for argv in ([], ["--help"], ["--version"], ["recipes", "list"], ["extnd"]):
        assert _app_for(argv) is app


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
    "phi3": (
        {
            "model_type": "phi3",
            "hidden_size": 64,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
        },
        "longrope",
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


def test_missing_and_malformed_config(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(
        capsys, "extend", tmp_path / "empty", "-o", tmp_path / "o", "-m", "yarn", "-f", "2"
    )
    assert code == 2 and "config.json" in err and err.count("\n") == 1
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    code, _, err = run_cli(capsys, "inspect", bad)
    assert code == 2 and "not valid JSON" in err and err.count("\n") == 1
    _write_config(tmp_path / "notype", {"hidden_size": 3})
    code, _, err = run_cli(capsys, "inspect", tmp_path / "notype")
    assert code == 2 and "model_type" in err


def test_debug_shows_traceback(tmp_path):
    cmd = [sys.executable, "-m", "ctxext", "inspect", str(tmp_path / "nope")]
    quiet = subprocess.run(cmd, capture_output=True, text=True)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    loud = subprocess.run([*cmd, "--debug"], capture_output=True, text=True)
    assert loud.returncode != 0 and "Traceback" in loud.stderr


def test_output_inside_input_refused(capsys, tiny_llama):
    before = tree_hash(tiny_llama)
    code, _, err = run_cli(
        capsys, "extend", tiny_llama, "-o", tiny_llama / "sub", "-m", "yarn", "-f", "2"
    )
    assert code == 2 and "inside the input" in err
    assert tree_hash(tiny_llama) == before


def test_inspect_rope_model(capsys, tiny_llama):
    code, out, _ = run_cli(capsys, "inspect", tiny_llama, "--target-length", "512", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["scheme"] == "rope" and report["trained_length"] == 128
    assert len(report["pairs"]) == 8  # head_dim 16 -> 8 pairs
    code, out, _ = run_cli(capsys, "inspect", tiny_llama)
    assert code == 0 and "wavelength" in out.lower()


def test_inspect_non_rope_model(capsys, tmp_path):
    src = _write_config(tmp_path / "gpt2", {"model_type": "gpt2", "n_positions": 1024})
    code, out, _ = run_cli(capsys, "inspect", src, "--json")
    assert code == 0 and json.loads(out)["scheme"] == "learned"


def test_partial_rotary_neox(capsys, tmp_path, tiny_tokenizer_dir):
    src = build_tiny_model(
        tmp_path / "neox", tiny_tokenizer_dir, "gpt_neox", partial_rotary_factor=0.25
    )
    code, out, _ = run_cli(capsys, "inspect", src, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["rotary_dim"] == 4 and len(report["pairs"]) == 2
    code, _, err = run_cli(capsys, "extend", src, "-o", tmp_path / "o", "-m", "ntk", "-f", "4")
    assert code == 0, err
