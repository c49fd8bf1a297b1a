"""ctxext.finetune.setup: bad options and output/--resume rules are refused in one line before
anything is loaded; an extended checkpoint is fine-tuned at its own length."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import FINETUNE_STEP_LINE, finetune_cfg, run_cli, subprocess_env

from ctxext.config import ExtendConfig
from ctxext.finetune.loop import run_finetune
from ctxext.finetune.state import newest_checkpoint, work_dir

CLI = [sys.executable, "-m", "ctxext"]
YARN2 = ExtendConfig(method="yarn", factor=2)  # 128 -> 256


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--steps", "0"], "steps"),
        (["--lora-rank", "0"], "--lora-rank: must be a positive integer"),
        (["--pose"], "--pose needs --train-length"),
        (["--pose", "--train-length", "1024"], "train length 1024 is longer than the target"),
        (["--factor", "2"], "need --method"),
        (["--method", "bogus", "--factor", "2"], "method"),
    ],
)
def test_bad_options_exit_2_with_one_line(tmp_path, tiny_llama_session, capsys, flags, needle):
    extra = [] if "--method" in flags or flags == ["--factor", "2"] else ["-m", "yarn", "-f", "4"]
    code, _, err = run_cli(
        capsys, "finetune", tiny_llama_session, "-o", tmp_path / "o", *extra, *flags
    )
    assert code == 2
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() and not work_dir(tmp_path / "o").exists()


def test_extended_checkpoint_is_finetuned_at_its_length(tmp_path, tiny_llama_session, capsys):
    ext = tmp_path / "ext"
    assert (
        run_cli(capsys, "extend", tiny_llama_session, "-o", ext, "-m", "linear", "-f", "2")[0] == 0
    )
    summary = run_finetune(str(ext), tmp_path / "ft", None, finetune_cfg(steps=1, grad_ckpt=True))
    assert (summary["method"], summary["factor"], summary["target_length"]) == ("linear", 2.0, 256)


def test_output_and_resume_rules(tmp_path, tiny_llama_session, capsys):
    model = str(tiny_llama_session)
    out = tmp_path / "o"
    flags = ["finetune", model, "-o", out, "-m", "yarn", "-f", "2", "--lr", "1e-3"]
    code, _, err = run_cli(capsys, *flags, "--steps", "4", "--resume")
    assert code == 2 and "no complete checkpoint" in err

    def crash(event, info):  # dies right after the first checkpoint, like a killed job
        if event == "checkpoint":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_finetune(model, out, YARN2, finetune_cfg(steps=4, save_every=2), progress=crash)
    assert not out.exists() and newest_checkpoint(work_dir(out)) is not None
    code, _, err = run_cli(capsys, *flags, "--steps", "4")
    assert code == 2 and "interrupted run" in err and "--resume" in err
    code, _, err = run_cli(capsys, *flags, "--steps", "4", "--resume")
    assert code == 2 and "started with finetune.warmup_steps=1, not 0.05" in err
    code, _, err = run_cli(capsys, *flags, "--steps", "5", "--warmup-steps", "1", "--resume")
    assert code == 2 and "started with finetune.steps=4, not 5" in err
    code, _, err = run_cli(
        capsys, *flags, "--steps", "4", "--warmup-steps", "1", "--save-every", "0", "--resume"
    )
    assert code == 0, err
    assert out.is_dir() and not work_dir(out).exists()
    code, _, err = run_cli(capsys, *flags, "--steps", "4", "--warmup-steps", "1", "--resume")
    assert code == 2 and "already finished" in err
    code, _, err = run_cli(capsys, *flags, "--steps", "1")
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert run_cli(capsys, *flags, "--steps", "1", "--overwrite", "--json")[0] == 0


@pytest.mark.slow
def test_two_finetunes_to_one_output_refuse_the_second(
    tmp_path, tiny_llama_session, calibrated, capsys
):
    # The session calibration: the first run trains until Ctrl-C, and its step check would
    # measure the machine into the shared cache if its first steps ran far from an estimate.
    out = tmp_path / "shared"
    args = [*CLI, "finetune", str(tiny_llama_session), "-o", str(out), "-m", "yarn", "-f", "2",
            "--steps", "100000", "--save-every", "0"]  # fmt: skip
    # Every update a progress line, so the test sees when the first run is training.
    first = subprocess.Popen(
        args, env={**subprocess_env(), "CTXEXT_PROGRESS_INTERVAL": "0"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    lines: list[str] = []
    training = threading.Event()

    def read_stderr() -> None:
        for line in first.stderr:
            lines.append(line)
            if FINETUNE_STEP_LINE.search(line):
                training.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        lock = tmp_path / ".shared.lock"
        deadline = time.time() + 120
        while not (lock.is_file() and lock.read_text().startswith("pid")):
            assert first.poll() is None and time.time() < deadline, "".join(lines)[-3000:]
            time.sleep(0.05)
        # The second run in this process: the lock is taken before anything heavy, so the
        # refusal needs no interpreter of its own.
        code, _, second_err = run_cli(capsys, *args[len(CLI) :])
        assert code == 2, second_err
        err = second_err.strip().splitlines()
        assert len(err) == 1 and "is being written by another ctxext run" in err[0]
        assert f"pid {first.pid}" in err[0]
        assert first.poll() is None  # the first run is untouched
        # Ctrl-C once it trains (as a user would stop it; see "Noticed" in the session notes
        # about a Ctrl-C that lands inside torch's start-up).
        assert training.wait(timeout=120), "".join(lines)[-3000:]
        first.send_signal(signal.SIGINT)
        first.wait(timeout=60)
        reader.join(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 130, "".join(lines)[-3000:]
    assert not lock.exists()  # released on exit


def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path, tiny_llama_session, capsys):
    out = tmp_path / "o"
    lock = tmp_path / ".o.lock"
    holder = subprocess.Popen(  # holds the lock as a real run does, then is killed
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from ctxext.outputs import output_lock\n"
         "with output_lock(Path(sys.argv[1])):\n print('locked', flush=True); time.sleep(600)",
         str(out)],
        env=subprocess_env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    flags = ["finetune", tiny_llama_session, "-o", out, "-m", "yarn", "-f", "2", "--steps", "1"]
    code, _, err = run_cli(capsys, *flags)
    assert code == 2 and f"pid {holder.pid}" in err
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock.is_file()  # a killed holder leaves its file behind...
    code, _, err = run_cli(capsys, *flags)
    assert code == 0, err  # ...and the next run takes it over
    assert out.is_dir() and not lock.exists()
