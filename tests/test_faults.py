"""Faults: hard kills, a full disk and Ctrl-C never leave partial output or touch the input."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import FINETUNE_STEP_LINE, tree_hash

from ctxext import checkpoint, outputs


def _extend_cmd(src: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ctxext", "extend", str(src), "-o", str(out), "-m", "yarn",
            "-f", "4", *extra]  # fmt: skip


def _complete(out: Path) -> bool:
    """A finished extend output: every file there and the weights byte-identical."""
    cfg = json.loads((out / "config.json").read_text())
    prov = json.loads((out / checkpoint.PROVENANCE_FILE).read_text())
    return cfg["rope_parameters"]["rope_type"] == "yarn" and "model.safetensors" in prov["files"]


def _temporaries(parent: Path, name: str) -> list[Path]:
    return list(parent.glob(f".{name}.tmp-*"))


def _kill_when(proc: subprocess.Popen, ready, delay: float, timeout: float = 30.0) -> None:
    """SIGKILL ``proc`` ``delay`` seconds after ``ready()`` first holds (or when it ends)."""
    t0 = time.time()
    while not ready() and proc.poll() is None and time.time() - t0 < timeout:
        time.sleep(0.0005)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


_KILL_AT_WRITE = """
import os, signal, sys
k, ops = int(sys.argv[1]), []

def hook(event, args):
    # open / copy / link / rename of anything inside the temporary folder is part of the write.
    if event in ("open", "shutil.copyfile", "os.link", "os.symlink", "os.rename"):
        if any(isinstance(a, (str, bytes, os.PathLike)) and ".tmp-" in os.fsdecode(a)
               for a in args):
            ops.append(event)
            if len(ops) == k:
                os.kill(os.getpid(), signal.SIGKILL)

sys.addaudithook(hook)
from ctxext.cli.app import main
main(sys.argv[2:])
"""


def test_kill_9_at_random_points_leaves_nothing_or_a_complete_checkpoint(tmp_path, tiny_llama):
    before = tree_hash(tiny_llama)
    rng = random.Random(0)
    outcomes = {"absent": 0, "complete": 0, "killed mid-write": 0}
    for i in range(10):
        out = tmp_path / f"out{i}"
        if i % 2:
            # Python start-up and imports take most of a second; spread kills over the run.
            cmd = _extend_cmd(tiny_llama, out, "--copy")
            proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
            _kill_when(proc, lambda: True, rng.uniform(0.05, 1.0))
        else:
            # The write itself takes about a millisecond, too short to hit by timing: the
            # process kills itself at its k-th file operation inside the temporary folder.
            cmd = _extend_cmd(tiny_llama, out, "--copy")[3:]
            k = str(rng.randint(1, 5))
            env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
            subprocess.run(
                [sys.executable, "-c", _KILL_AT_WRITE, k, *cmd], env=env, capture_output=True
            )
        if _temporaries(tmp_path, out.name):
            # killed while the output was being written: nothing may be at the final path
            outcomes["killed mid-write"] += 1
            assert not out.exists()
        if out.exists():
            assert _complete(out)
            assert (out / "model.safetensors").read_bytes() == (
                tiny_llama / "model.safetensors"
            ).read_bytes()
            outcomes["complete"] += 1
        else:
            outcomes["absent"] += 1
    assert tree_hash(tiny_llama) == before
    # The test is only worth something if some kills really landed inside the write.
    assert outcomes["killed mid-write"] >= 2, outcomes
    # The next run cleans up temporaries that killed runs left behind.
    subprocess.run(_extend_cmd(tiny_llama, tmp_path / "out0", "--overwrite"), check=True)
    assert _temporaries(tmp_path, "out0") == []


@pytest.fixture
def tiny_disk(tmp_path):
    """A 96 KiB tmpfs: a real ENOSPC (needs mount rights, i.e. root; skipped elsewhere)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)], capture_output=True
    )
    if res.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_exit_1_clean_message_no_partial_output(tmp_path, tiny_llama, tiny_disk):
    assert (tiny_llama / "model.safetensors").stat().st_size > 96 * 1024
    before = tree_hash(tiny_llama)
    out = tiny_disk / "out"
    res = subprocess.run(_extend_cmd(tiny_llama, out, "--copy"), capture_output=True, text=True)
    assert res.returncode == 1, res.stderr
    assert "no space left" in res.stderr and res.stderr.count("\n") == 1
    assert "Traceback" not in res.stderr
    assert list(tiny_disk.iterdir()) == [], "temporary folder left behind"
    assert tree_hash(tiny_llama) == before


#: The first progress line of the phase each interrupted command is in when Ctrl-C comes: the
#: eval's passkey task, the fine-tune's training steps (its 3000 steps' data, 768k tokens, is
#: packed in a second or two). The run has no calibration: it is interrupted while its pre-run
#: check measures the machine (once the runtime probe's subprocess is up).
_MID_WAY = {
    "eval": re.compile(r" passkey: [\d,]+/[\d,]+ tok"),
    "finetune": FINETUNE_STEP_LINE,
}


def _measuring(proc: subprocess.Popen) -> bool:
    """Whether ``proc`` has started the calibration's runtime probe (a child process)."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children()
        return any("runtime_probe" in " ".join(c.cmdline()) for c in children)
    except psutil.Error:
        return False


@pytest.mark.parametrize("command", ["eval", "finetune", "run"])
def test_ctrl_c_exits_130_promptly_without_output(tmp_path, tiny_llama, command, request):
    if command != "run":  # the eval and the fine-tune start their work at once
        request.getfixturevalue("calibrated")
    out = tmp_path / "results"
    long_jobs = {  # each would run for minutes: we interrupt it mid-way
        "eval": ["eval", str(tiny_llama), "--lengths", "256,384", "--task", "passkey",
                 "--passkey-trials", "5000", "-o", str(out)],
        "finetune": ["finetune", str(tiny_llama), "-o", str(out), "-m", "yarn", "-f", "2",
                     "--steps", "3000", "--save-every", "0"],
        "run": ["run", str(_recipe(tmp_path, tiny_llama, out))],
    }  # fmt: skip
    # Every update a progress line (stderr is a pipe): Ctrl-C comes once the work is under way.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "CTXEXT_PROGRESS_INTERVAL": "0"}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctxext", *long_jobs[command]],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # A child inherits an *ignored* SIGINT (some earlier tests' libraries ignore it in this
        # process), and Python then installs no KeyboardInterrupt handler: give it the default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines: list[str] = []
    mid_way = threading.Event()

    def read_stderr() -> None:
        for line in proc.stderr:
            lines.append(line)
            if command in _MID_WAY and _MID_WAY[command].search(line):
                mid_way.set()

    def under_way() -> bool:
        return mid_way.is_set() if command in _MID_WAY else _measuring(proc)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        deadline = time.time() + 120  # imports, model load, then into the work
        while not under_way():
            time.sleep(0.01)
            assert proc.poll() is None, "".join(lines)[-3000:]
            assert time.time() < deadline, "".join(lines)[-3000:]
        assert proc.poll() is None, "".join(lines)[-3000:]
        proc.send_signal(signal.SIGINT)
        t0 = time.time()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:  # never leave a runaway job behind a failed test
            proc.kill()
            proc.wait()
    reader.join(timeout=30)
    stderr = "".join(lines)
    assert proc.returncode == 130, stderr[-3000:]
    assert time.time() - t0 < 10
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "interrupted"
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".results")]


def _recipe(tmp: Path, model: Path, out: Path) -> Path:
    path = tmp / "long.yaml"
    path.write_text(
        f"model: {model}\noutput_dir: {out}\nextend: {{method: yarn, factor: 2.0}}\n"
        "finetune: {steps: 100000, save_every: 0}\neval: {lengths: [128]}\n"
    )
    return path


def test_atomic_output_cleans_up_on_error(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(RuntimeError), outputs.atomic_output(out) as tmp:
        (tmp / "half.json").write_text("{}")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    os.sync()


_KILL_AT_SECOND_RENAME = """
import os, signal, sys
from pathlib import Path

out = Path(sys.argv[1])
renames = []

def hook(event, args):
    # The audit event fires before the rename runs: once the old folder was moved aside, the
    # rename that would put the new folder in its place kills the process instead.
    if event == "os.rename" and ".old-" in os.fsdecode(args[1]):
        renames.append("aside")
    elif event == "os.rename" and renames and Path(os.fsdecode(args[1])) == out:
        os.kill(os.getpid(), signal.SIGKILL)

sys.addaudithook(hook)
from ctxext.cli.app import main
main(sys.argv[2:])
"""


def test_kill_between_overwrite_renames_leaves_nothing_after_the_next_run(tmp_path, tiny_llama):
    out = tmp_path / "out"
    subprocess.run(_extend_cmd(tiny_llama, out), check=True, capture_output=True)
    first = json.loads((out / "config.json").read_text())
    cmd = _extend_cmd(tiny_llama, out, "--overwrite")[3:]  # the CLI arguments only
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    killed = subprocess.run(
        [sys.executable, "-c", _KILL_AT_SECOND_RENAME, str(out), *cmd], env=env,
        capture_output=True, text=True,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # Killed between the renames: the old output moved aside, the new one not yet in place.
    assert not out.exists()
    assert [p.name for p in tmp_path.glob(".out.old-*")], "the kill came too early or late"
    assert [p.name for p in tmp_path.glob(".out.tmp-*")]
    res = subprocess.run(
        _extend_cmd(tiny_llama, out, "--overwrite"), capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny-llama"]
    assert json.loads((out / "config.json").read_text()) == first


def test_next_run_puts_back_what_a_killed_overwrite_moved_aside(tmp_path, tiny_llama):
    # The same kill, then a run that does not replace OUT (no --overwrite): the old output is
    # restored (the replacement never completed), so that run is refused as before the kill.
    out = tmp_path / "out"
    subprocess.run(_extend_cmd(tiny_llama, out), check=True, capture_output=True)
    before = tree_hash(out)
    cmd = _extend_cmd(tiny_llama, out, "--overwrite")[3:]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", _KILL_AT_SECOND_RENAME, str(out), *cmd], env=env)
    assert not out.exists()
    res = subprocess.run(_extend_cmd(tiny_llama, out), capture_output=True, text=True)
    assert res.returncode == 2 and "already exists" in res.stderr
    assert tree_hash(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny-llama"]
