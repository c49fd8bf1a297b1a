"""Progress (ctxext/cli/progress.py): bars on terminals, gone when the command fails; plain lines
with rate and ETA in logs and pipes, from every long phase of the real commands."""

from __future__ import annotations

import io

import pytest
from conftest import run_cli
from rich.console import Console

from ctxext.cli.progress import (
    INTERVAL_ENV,
    PhaseLog,
    log_interval,
    search_progress,
    step_progress,
    token_progress,
)
from ctxext.errors import CtxextError


def _terminal() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=120)


@pytest.mark.parametrize("factory", [token_progress, step_progress])
def test_bar_stays_after_success_and_vanishes_after_failure(factory):
    fields = {"loss": "-", "tps": "-"}
    ok = factory(_terminal())
    with ok:
        ok.update(ok.add_task("work", total=4, **fields), completed=4)
    assert not ok.live.transient  # the finished bar stays on screen
    assert "4/4" in ok.console.file.getvalue()

    failed = factory(_terminal())
    with pytest.raises(RuntimeError), failed:
        failed.add_task("work", total=4, **fields)
        raise RuntimeError("boom")
    assert failed.live.transient  # erased, so the error that follows is the only line


def _plain() -> Console:
    return Console(file=io.StringIO(), force_terminal=False, width=80)


@pytest.mark.parametrize("factory", [token_progress, step_progress])
def test_lines_not_a_bar_when_not_a_terminal(factory, monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "0")  # a line at every update
    console = _plain()
    bar = factory(console)
    with bar:
        task = bar.add_task("work", total=4, loss="-", tps="-", unit="things")
        bar.update(task, completed=2, loss="1.2345", tps="99")
        bar.update(task, completed=4)
    lines = console.file.getvalue().splitlines()
    assert lines[0] == "work: started (4 things)"
    assert lines[1].startswith("work: 2/4 things (50%), ") and "ETA" in lines[1]
    if factory is step_progress:
        assert lines[1].endswith("; loss 1.2345, 99 tok/s")
    assert lines[2].startswith("work: done, 4 things in ")
    assert len(lines) == 3 and "\x1b" not in console.file.getvalue()  # no bar, no colour codes


def test_a_phase_that_stops_short_ends_with_the_command():
    console = _plain()
    bar = search_progress(console)
    with bar:
        bar.update(bar.add_task("tune", total=100, best=""), completed=40, best="yarn 9.1")
    assert console.file.getvalue().splitlines()[-1].startswith("tune: done, 40 forwards in ")


def test_lines_come_at_most_every_interval_with_rate_and_eta():
    now = [0.0]
    log = PhaseLog(_plain(), interval=30, clock=lambda: now[0])
    log.start("k", "finetune", total=400, unit="steps")
    for step in range(1, 101):  # a step a second: lines at 30, 60 and 90 s only
        now[0] = float(step)
        log.update("k", step, detail=f"loss {step}")
    lines = log.console.file.getvalue().splitlines()
    assert lines == [
        "finetune: started (400 steps)",
        "finetune: 30/400 steps (8%), 1.0 steps/s, elapsed 30s, ETA 6m10s; loss 30",
        "finetune: 60/400 steps (15%), 1.0 steps/s, elapsed 1m00s, ETA 5m40s; loss 60",
        "finetune: 90/400 steps (22%), 1.0 steps/s, elapsed 1m30s, ETA 5m10s; loss 90",
    ]
    now[0] = 400.0
    log.update("k", 400)
    assert log.console.file.getvalue().splitlines()[-1] == (
        "finetune: done, 400 steps in 6m40s, 1.0 steps/s; loss 100"
    )


def test_a_lazy_log_says_nothing_of_a_short_phase():
    now = [0.0]
    log = PhaseLog(_plain(), interval=30, clock=lambda: now[0], lazy=True)
    log.start("load", "loading model", None)
    now[0] = 29.0
    log.finish("load")  # shorter than the interval: an error that follows stays one line
    assert log.console.file.getvalue() == ""
    log.start("pack", "packing data", total=100, unit="tok")
    now[0] = 60.0
    log.update("pack", 50)
    now[0] = 70.0
    log.finish("pack")
    assert log.console.file.getvalue().splitlines() == [
        "packing data: started (100 tok)",
        "packing data: 50/100 tok (50%), 1.6 tok/s, elapsed 31s, ETA 31s",
        "packing data: done, 50 tok in 41s, 1.2 tok/s",
    ]


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf"])
def test_a_bad_interval_is_refused_in_one_line(value, monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, value)
    with pytest.raises(CtxextError, match=INTERVAL_ENV):
        log_interval()
    monkeypatch.setenv(INTERVAL_ENV, "2.5")
    assert log_interval() == 2.5


# --------------------------------------------------------------------------- real commands
# Under capsys stderr is not a terminal, as in `ctxext ... 2>&1 | cat` or `> log`.


def test_finetune_in_a_log_reports_packing_and_steps(
    capsys, tmp_path, tiny_llama_session, monkeypatch
):
    monkeypatch.setenv(INTERVAL_ENV, "0")
    code, _, err = run_cli(capsys, "finetune", tiny_llama_session, "-o", tmp_path / "o", "-m",
                           "yarn", "-f", "2", "--steps", "3", "--warmup-steps", "1")  # fmt: skip
    assert code == 0, err
    lines = err.splitlines()
    assert "packing training data: started" in lines
    assert "packing stdlib: started (768 tok)" in lines
    assert any(line.startswith("packing stdlib: done, ") for line in lines)
    assert "finetune: started (3 steps)" in lines
    step = [line for line in lines if line.startswith("finetune: 2/3 steps (67%), ")]
    assert len(step) == 1 and "steps/s" in step[0] and "ETA" in step[0] and "loss " in step[0]
    assert any(line.startswith("finetune: done, 3 steps in ") for line in lines)


def test_eval_in_a_log_reports_each_task(capsys, tiny_llama_session, monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "0")
    code, _, err = run_cli(capsys, "eval", tiny_llama_session, "--lengths", "256",
                           "--num-docs", "2", "--task", "ppl", "--task", "passkey",
                           "--passkey-trials", "1")  # fmt: skip
    assert code == 0, err
    lines = err.splitlines()
    for task in ("ppl", "passkey"):
        assert any(f" {task}: started (" in line and line.endswith(" tok)") for line in lines)
        assert any(f" {task}: done, " in line and " tok in " in line for line in lines), err


def test_tune_in_a_log_reports_the_search(capsys, tmp_path, tiny_llama_session, monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "0")
    code, _, err = run_cli(capsys, "tune", tiny_llama_session, "-o", tmp_path / "t",
                           "--target-length", "256", "--methods", "yarn", "--budget-evals", "4",
                           "--search-docs", "2", "--report-docs", "1")  # fmt: skip
    assert code == 0, err
    lines = err.splitlines()
    assert "tune: calibrating: started" in lines
    assert any(line.startswith("tune: ") and " forwards (" in line and "ETA" in line
               for line in lines), err  # fmt: skip
    assert any(line.startswith("tune: done, ") for line in lines)
