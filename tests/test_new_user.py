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
