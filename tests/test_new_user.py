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
    from ctxext.recipes.loader import shipped_recipes

    return list(shipped_recipes())


@pytest.mark.parametrize("name", _shipped())
def test_recipes_show_prints_the_file_unchanged(capsys, name):
    from ctxext.recipes.loader import find_recipe

    code, out, err = run_cli(capsys, "recipes", "show", name)
    assert code == 0, err
    path, _ = find_recipe(name)
    assert out == path.read_text(encoding="utf-8")


def test_recipes_show_resolved_is_complete_yaml(capsys):
    import yaml

    from ctxext.recipes.loader import load_recipe

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


def test_plural():
    from ctxext.text import plural

    assert [plural(n, "sequence") for n in (0, 1, 2, 1500)] == [
        "0 sequences", "1 sequence", "2 sequences", "1,500 sequences"
    ]  # fmt: skip
    assert plural(1, "process", "processes") == "1 process"
    assert plural(4, "process", "processes") == "4 processes"


def test_one_more_problem_is_singular(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: stdlib-llama\nextend: {method: yarn, factor: 0.5}\nseed: x\n")
    code, _, err = run_cli(capsys, "recipes", "validate", bad)
    assert code == 2 and err.rstrip().endswith("(and 1 more problem)"), err
    bad.write_text("model: stdlib-llama\nextend: {method: yarn, factor: 0.5}\nseed: x\nfoo: 1\n")
    code, _, err = run_cli(capsys, "recipes", "validate", bad)
    assert code == 2 and err.rstrip().endswith("(and 2 more problems)"), err


def test_flag_errors_share_the_recipe_formatter(capsys):
    """One formatter: a bad flag value reads like a bad recipe value ("expected ... (got ...)"),
    named by the flag the user typed."""
    code, _, err = run_cli(capsys, "eval", "--dtype", "fp8", "--lengths", "64")
    assert code == 2
    assert err.strip() == (
        "error: --dtype: expected 'auto', 'float32', 'bfloat16' or 'float16' (got 'fp8')"
    )


@pytest.mark.parametrize(
    ("steps", "warmup", "resolved"),
    [(5, None, 1), (400, None, 20), (30, 5, 5), (10, 0.25, 3), (3, 0, 0), (4, 4.0, 4)],
)
def test_warmup_is_steps_or_a_fraction_like_transformers(steps, warmup, resolved):
    from ctxext.config import FinetuneConfig
    from ctxext.finetune.optim import lr_factor

    given = {} if warmup is None else {"warmup_steps": warmup}
    cfg = FinetuneConfig(steps=steps, **given)
    assert cfg.warmup() == resolved
    # the last warm-up step reaches lr: a short run is not stuck at a sliver of it
    assert lr_factor(max(resolved - 1, 0), cfg) == 1.0
    assert lr_factor(0, cfg) == (1.0 if resolved <= 1 else 1 / resolved)


def test_warmup_longer_than_the_run_is_refused(capsys, tmp_path):
    code, _, err = run_cli(capsys, "finetune", "-o", tmp_path / "o", "-m", "yarn", "-f", "2",
                           "--steps", "5", "--warmup-steps", "20")  # fmt: skip
    assert code == 2 and err.count("\n") == 1
    assert "--warmup-steps: 20 warm-up steps are more than steps (5)" in err
    code, _, err = run_cli(capsys, "finetune", "-o", tmp_path / "o", "--steps", "5",
                           "--warmup-steps", "2.5")  # fmt: skip
    assert code == 2 and "whole number of steps or a fraction below 1" in err
    code, _, err = run_cli(capsys, "run", "llama2-7b-yarn-64k", "finetune.steps=10")
    assert code == 2 and "finetune.warmup_steps (line 36): 20 warm-up steps" in err


def test_short_finetune_trains_at_lr_and_writes_weights_like_other_files(
    capsys, tmp_path, tiny_llama
):
    """--steps 3 without --warm-up-steps: trained at lr (not 1/20 of it); weights not 0600."""
    import json
    import os

    out = tmp_path / "ft"
    code, _, err = run_cli(capsys, "finetune", tiny_llama, "-o", out, "-m", "yarn", "-f", "2",
                           "--steps", "3", "--lr", "1e-3", "--save-every", "0", "--json")  # fmt: skip
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == [1e-3] * 3
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
    assert "model.safetensors" in modes and "loss.png" in modes
    assert set(modes.values()) == {0o666 & ~umask}, modes


def _loss_lines(n: int) -> list:
    from ctxext.report.plots import loss_figure, pyplot

    fig = loss_figure([{"step": i + 1, "loss": 5.0 - 0.01 * i} for i in range(n)])
    lines = [(ln.get_label(), ln.get_alpha(), len(ln.get_xdata())) for ln in fig.axes[0].lines]
    pyplot().close(fig)
    return lines


def test_loss_plot_shows_the_raw_loss_of_a_short_run():
    assert _loss_lines(3) == [("loss", None, 3)]  # fully opaque, no 1-step "average" on top
    assert _loss_lines(39) == [("loss", None, 39)]
    assert _loss_lines(100) == [("loss", 0.35, 100), ("moving average (5 steps)", None, 100)]


def _results(lengths: list[int]) -> dict:
    runs = [{"label": "m", "trained_length": 128,
             "ppl": {str(n): {"ppl": 10.0 + n / 100} for n in lengths}}]  # fmt: skip
    return {"runs": runs}


def test_terminal_plot_needs_two_lengths():
    from ctxext.report.plots import terminal_plot

    assert terminal_plot(_results([256])) == ""
    assert "perplexity vs context length" in terminal_plot(_results([256, 512]))


def test_recipe_lengths_take_the_cli_forms(tmp_path):
    from ctxext.recipes.loader import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("model: stdlib-llama\neval: {lengths: [256, 1k, 2K]}\n")
    assert load_recipe(str(path)).recipe.eval.lengths == [256, 1024, 2048]
    assert load_recipe(str(path), ["eval.lengths=512,1k"]).recipe.eval.lengths == [512, 1024]
    path.write_text("model: stdlib-llama\neval: {lengths: [256, lots]}\n")
    with pytest.raises(Exception, match=r"eval.lengths.1 \(line 2\): expected a valid integer"):
        load_recipe(str(path))
