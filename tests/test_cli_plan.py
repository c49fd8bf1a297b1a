"""`ctxext plan` (ctxext/cli/app.py) and the pre-run memory check (ctxext/cli/guard.py): runs
refused before anything is loaded, and plans printed without loading.

The refusal tests use a model folder that has a real config and tokenizer but a weight file that
cannot be loaded: a run that got as far as loading would fail with "could not load the weights";
a refused one never gets there.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import BUNDLED, run_cli


@pytest.fixture
def weightless(tmp_path) -> Path:
    """The bundled model's config and tokenizer with a weight file that cannot be loaded: the
    pre-flight sees weights, and any attempt to load them would fail with another error."""
    path = tmp_path / "no-weights"
    shutil.copytree(BUNDLED, path, ignore=shutil.ignore_patterns("*.safetensors"))
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    return path


def test_weightless_model_fails_at_loading_without_a_limit(weightless, capsys, calibrated):
    # The control: with memory to spare the run proceeds until it needs the weights.
    code, _, err = run_cli(capsys, "eval", weightless, "--lengths", "64", "--num-docs", "1")
    assert code == 2 and "could not load the weights" in err


@pytest.mark.parametrize("how", ["env", "option"])
def test_over_budget_eval_is_refused_before_loading(
    weightless, capsys, calibrated, monkeypatch, how
):
    args = ["eval", weightless, "--lengths", "64,1024", "--num-docs", "1"]
    if how == "env":
        monkeypatch.setenv("CTXEXT_MEMORY_LIMIT", "1MB")
    else:
        args += ["--memory-limit", "1MB"]
    code, out, err = run_cli(capsys, *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "needs ~" in lines[0] and "977 KiB is available" in lines[0]
    assert "eval 1,024 tokens" in lines[0]  # the phase that decides the peak
    assert "could not load the weights" not in err and out == ""


def test_over_budget_finetune_is_refused_with_what_would_fit(tmp_path, capsys, calibrated):
    # Estimate the full fine-tune and the same with gradient checkpointing, then give it a
    # limit between the two: gradient checkpointing (or LoRA) must be named, and the run must
    # not start (no work folder, no output). (A fixed 15% cut stopped fitting when the
    # calibrated runtime grew: the saving of checkpointing is a share of activations only.)
    base = ["finetune", "-o", tmp_path / "out", "-m", "yarn", "-t", "4096", "--steps", "2"]
    code, out, err = run_cli(capsys, "plan", *base, "--json")
    assert code == 0, err
    need = json.loads(out)["peak"]
    code, out, err = run_cli(capsys, "plan", *base, "--grad-ckpt", "--json")
    assert code == 0, err
    ckpt_need = json.loads(out)["peak"]
    assert ckpt_need < need
    code, _, err = run_cli(capsys, *base, "--memory-limit", str((need + ckpt_need) // 2))
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1
    assert "would fit:" in err and ("--grad-ckpt" in err or "--lora-rank" in err)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out.ctxext-work").exists()
    assert not any(p.name.endswith(".lock") for p in tmp_path.iterdir())


def test_plan_prints_every_component_without_loading(weightless, tmp_path, capsys, calibrated):
    code, out, err = run_cli(
        capsys, "plan", "finetune", weightless, "-o", tmp_path / "o", "-m", "yarn",
        "-f", "4", "--steps", "10", "--lora-rank", "8", "--grad-ckpt", "--json",
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(out)
    phase = data["phases"][0]
    for key in ("weights", "optimizer", "gradients", "activations", "activations_other",
                "attention", "loss", "runtime", "peak", "seconds_per_step", "seconds"):  # fmt: skip
        assert phase[key] > 0 or key == "attention", key
    assert phase["params_trainable"] < phase["params_total"]
    assert phase["activations"] < phase["activations_other"]  # checkpointing saves memory
    assert data["fits"] is True and data["seconds"] == pytest.approx(10 * phase["seconds_per_step"])
    assert not (tmp_path / "o").exists()
    # The table form names every component.
    code, out, _ = run_cli(capsys, "plan", "eval", weightless, "--lengths", "256,512")
    assert code == 0
    for word in ("weights", "activations", "loss", "peak", "time per token", "total time"):
        assert word in out


def test_plan_counts_the_episode_mask(weightless, tmp_path, capsys, calibrated):
    """Task episodes add their block mask, one [L, L] fp32 tensor on this CPU, to attention
    and to the peak."""
    from ctxext.finetune.episodes import mask_bytes

    base = ["plan", "finetune", weightless, "-o", tmp_path / "o", "-m", "yarn", "-f", "2",
            "--mix", "stdlib:1", "--mix", "multikey:1", "--json"]  # fmt: skip
    code, out, err = run_cli(capsys, *base)
    assert code == 0, err
    plain = json.loads(out)["phases"][0]
    code, out, err = run_cli(capsys, *base, "--task-min-length", "160")
    assert code == 0, err
    episodes = json.loads(out)["phases"][0]
    assert episodes["attention"] - plain["attention"] == mask_bytes(1, 512, 4) == 2**20
    assert episodes["peak"] - plain["peak"] == 2**20
    # Short batches (--short-fraction) carry the same mask.
    code, out, err = run_cli(capsys, *base, "--short-fraction", "0.5")
    assert code == 0, err
    assert json.loads(out)["phases"][0]["attention"] == episodes["attention"]


def test_plan_refuses_unknown_commands(capsys):
    code, _, err = run_cli(capsys, "plan", "extend", "-o", "x")
    assert code == 2 and "use eval, finetune or run" in err


def test_the_plan_of_a_run_reads_whole_at_80_columns(capsys, calibrated):
    """Every label, header and figure whole in an 80-column terminal (the default of a console
    that is not a terminal); the eval phases' time given from eval.num_docs."""
    code, out, err = run_cli(capsys, "plan", "run", "tiny-yarn")
    assert code == 0, err
    lines = out.splitlines()
    assert max(map(len, lines)) <= 80 and "…" not in out and "?" not in out
    assert "eval eval" not in out
    for label in ("activ. ckpt", "activ. no ckpt", "runtime", "loss (logits)", "time per token"):
        assert any(line.lstrip().startswith(label) for line in lines), label
    # The phases' time rows (one per table: a busy machine's longer figures can split the
    # table): a time for each of the 5 phases, none unknown.
    time_rows = [line for line in lines if line.split()[:2] not in (["time", "per"],)
                 and line.split()[:1] == ["time"]]  # fmt: skip
    times = re.findall(r"\d[\d.,]* (?:s|min|h)\b", " ".join(time_rows))
    assert time_rows and "unknown" not in " ".join(time_rows) and len(times) == 5, time_rows
    total = next(line for line in lines if line.lstrip().startswith("total time"))
    assert "unknown" not in total
    # Without num_docs the documents decide the eval's time: said in words, not "?".
    code, out, err = run_cli(capsys, "plan", "run", "tiny-yarn", "eval.num_docs=null")
    assert code == 0, err
    assert "?" not in out and "unknown: an eval's time depends on its documents" in out


def test_a_plan_wider_than_the_terminal_is_split_not_cut(capsys, calibrated):
    lengths = [256 * i for i in range(1, 11)]
    code, out, err = run_cli(
        capsys, "plan", "eval", "--lengths", ",".join(map(str, lengths)), "--num-docs", "1"
    )
    assert code == 0, err
    assert max(map(len, out.splitlines())) <= 80 and "…" not in out and "?" not in out
    assert out.count("parameters") >= 2  # the phases went into more than one table
    for n in lengths:
        assert f"{n:,}" in out
    assert out.count("total time") == 1
