"""What a new user meets first: help screens, `recipes show`, tables at 80 columns, messages.

Each test here guards one finding of trying ctxext as a newcomer would (issue 17).
"""

from __future__ import annotations

import re

import pytest
from conftest import run_cli

COMMANDS = [
    [],
    ["extend"],
    ["inspect"],
    ["eval"],
    ["finetune"],
    ["run"],
    ["recipes"],
    ["recipes", "list"],
    ["recipes", "show"],
    ["recipes", "validate"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "ctxext")
def test_help_fits_80_columns_without_type_noise(capsys, monkeypatch, command):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run_cli(capsys, *command, "--help")
    assert code == 0 and "Usage" in out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "<bool>" not in out  # flags take no value
    options = [line for line in lines if re.search(r"│ +(\* +)?--", line)]
    assert options and not any("<list[" in line for line in options)  # -m <str>, repeatable
    assert not re.search(r"--no-(overwrite|dry-run)", out)  # single flags, as everywhere else
    help_line = next(line for line in options if "--help" in line)
    assert re.search(r"--help +Show this", help_line)


def _shipped() -> list[str]:
    from ctxext.recipes import shipped_recipes

    return list(shipped_recipes())


@pytest.mark.parametrize("name", _shipped())
def test_recipes_show_prints_the_file_unchanged(capsys, name):
    from ctxext.recipes import find_recipe

    code, out, err = run_cli(capsys, "recipes", "show", name)
    assert code == 0, err
    path, _ = find_recipe(name)
    assert out == path.read_text(encoding="utf-8")


def test_recipes_show_resolved_is_complete_yaml(capsys):
    import yaml

    from ctxext.recipes import load_recipe

    code, out, err = run_cli(capsys, "recipes", "show", "llama2-7b-yarn-128k", "--resolved")
    assert code == 0, err
    assert yaml.safe_load(out) == load_recipe("llama2-7b-yarn-128k").resolved()


def _fits_80(text: str) -> None:
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text and "..." not in text  # nothing cut


@pytest.mark.parametrize("target", ["1024", "100000"])
def test_inspect_table_one_line_per_pair_at_80_columns(capsys, target):
    code, out, err = run_cli(capsys, "inspect", "-t", target)
    assert code == 0, err
    _fits_80(out)
    rows = [line.split() for line in out.splitlines() if re.match(r" +\d+ ", line)]
    assert [int(r[0]) for r in rows] == list(range(32))  # bundled model: d = 64, 32 pairs
    assert all(len(r) == 3 + 2 * 5 for r in rows)  # pair, wavelength, turns, 5 x (stretch, I/E/B)
    assert rows[0][3] == f"x{int(target) / 256:.3g}"  # linear stretches every pair by s


def test_extend_dry_run_diff_at_80_columns(capsys, tmp_path):
    code, out, err = run_cli(capsys, "extend", "-o", tmp_path / "x", "-m", "yarn", "-f", "4",
                             "--dry-run")  # fmt: skip
    assert code == 0, err
    _fits_80(out)
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if "." in line}
    # the legacy mirror, added whole, is shown key by key, not as cut-off JSON
    assert rows["rope_scaling.rope_type"] == ["-", "yarn"]
    assert rows["rope_scaling.original_max_position_embeddings"] == ["-", "256"]
    assert rows["rope_parameters.original_max_position_embeddings"] == ["-", "256"]
    assert rows["tokenizer_config.model_max_length"] == ["256", "1024"]


def test_no_base_without_a_method_is_refused(capsys, tmp_path):
    """Skipping the base rows with no method leaves nothing to evaluate: say so, do nothing."""
    code, out, err = run_cli(capsys, "eval", "--no-base", "--lengths", "64", "-o", tmp_path / "r")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "--no-base" in err and "-m" in err, err
    assert not (tmp_path / "r").exists()
