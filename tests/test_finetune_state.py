"""ctxext.finetune.state: resumable checkpoints. Resuming after SIGKILL, after a NaN, or past a
damaged checkpoint gives the weights of the uninterrupted run."""

from __future__ import annotations

import itertools
import json
import math
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import finetune_cfg, max_weight_diff, model_weights, run_cli, subprocess_env

from ctxext.config import ExtendConfig, FinetuneConfig
from ctxext.finetune.loop import run_finetune
from ctxext.finetune.state import LOG_FILE, checkpoint_problem, newest_checkpoint, work_dir

CLI = [sys.executable, "-m", "ctxext"]
YARN2 = ExtendConfig(method="yarn", factor=2)  # 128 -> 256
CPU_ONLY = pytest.mark.skipif(
    torch.cuda.is_available(), reason="compares CPU runs (bitwise / 2 gloo processes)"
)


def stdlib_dataset(folder: Path, n: int = 120) -> Path:
    """A local dataset folder (read by `datasets`, streamed): stdlib training files as a
    train.jsonl split."""
    from ctxext.corpus import stdlib_documents

    folder.mkdir(parents=True)
    docs = itertools.islice(stdlib_documents("train"), n)
    lines = [json.dumps({"text": d.text, "path": d.name}) for d in docs]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _kill_at_first_checkpoint(proc: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    """SIGKILL ``proc`` as soon as its first checkpoint is complete (or when it ends)."""
    deadline = time.time() + timeout
    while newest_checkpoint(work_dir(out)) is None and proc.poll() is None:
        if time.time() > deadline:
            return
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@CPU_ONLY
@pytest.mark.parametrize("data", ["stdlib", "streamed", "mix"])
def test_resume_after_sigkill_gives_the_same_weights(tmp_path, tiny_llama_session, data):
    args = ["--method", "yarn", "--factor", "2", "--steps", "24", "--lr", "1e-3",
            "--warmup-steps", "3", "--lr-schedule", "cosine", "--save-every", "3", "--seed", "5"]  # fmt: skip
    options: dict = {}
    if data != "stdlib":  # a seeded shuffle buffer over a stream: resuming must rebuild it
        options = {"data": str(stdlib_dataset(tmp_path / "ds")), "shuffle_buffer": 8}
        args += ["--shuffle-buffer", "8"]
    if data == "mix":  # and the mix's draws, and its task sequences (filler from the stream)
        mix = [f"{options.pop('data')}:0.4", "stdlib:0.2", "multikey:0.25", "multihop:0.15"]
        options["mix"] = mix
        # Two hops and three keys: a 5-fact chain, or 4 facts and 2 questions, in the longest
        # (prose) training forms do not fit 256 of this tokenizer's tokens.
        options["tasks"] = {"hops": 2, "keys": 3}
        args += [x for m in mix for x in ("--mix", m)] + ["--task-hops", "2", "--task-keys", "3"]
    elif "data" in options:
        args += ["--data", options["data"]]
    cfg = FinetuneConfig(
        steps=24, lr=1e-3, warmup_steps=3, lr_schedule="cosine", save_every=3, seed=5, **options
    )
    # The run to kill starts first: its imports (a few seconds) overlap the reference run here.
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [*CLI, "finetune", str(tiny_llama_session), "-o", str(out), *args],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    killer = threading.Thread(target=_kill_at_first_checkpoint, args=(proc, out), daemon=True)
    killer.start()
    try:
        ref = tmp_path / "ref"
        ref_summary = run_finetune(str(tiny_llama_session), ref, YARN2, cfg)
        killer.join(timeout=120)
    finally:
        if proc.poll() is None:  # the killer timed out: never leave a run behind
            proc.kill()
            proc.wait()
    if data == "mix":
        drawn = {s["source"]: s["samples"] for s in ref_summary["data"]["mix"]["sources"]}
        assert all(drawn.values()) and sum(drawn.values()) == 24  # every source drawn
    else:
        assert ref_summary["data"]["split"] == ("train" if data == "streamed" else None)

    assert newest_checkpoint(work_dir(out)) is not None, "no checkpoint appeared"
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not out.exists()  # the output appears only when training is done
    killed_at = int(newest_checkpoint(work_dir(out)).name.split("-")[1])
    assert 3 <= killed_at < 24
    # A kill during a save leaves a half-written temporary folder: resume must pass over it.
    half = work_dir(out) / "checkpoints" / f".tmp-step-{killed_at + 3:06d}"
    half.mkdir(exist_ok=True)
    (half / "model.safetensors").write_bytes(b"\0" * 10)
    assert newest_checkpoint(work_dir(out)).name == f"step-{killed_at:06d}"

    summary = run_finetune(str(tiny_llama_session), out, YARN2, cfg, resume=True)
    assert summary["resumed_from_step"] == killed_at
    assert max_weight_diff(model_weights(out), model_weights(ref)) <= 1e-6
    steps = [json.loads(x)["step"] for x in (out / "training_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 25))  # no step logged twice, none missing


def _nan_flags(model: Path, out: Path) -> list:
    return ["finetune", model, "-o", out, "-m", "yarn", "-f", "2", "--steps", "6", "--lr",
            "1e-3", "--warmup-steps", "1", "--save-every", "2", "--max-grad-norm", "0.5"]  # fmt: skip


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_llama_session) -> Path:
    """The same six steps as _nan_flags, never interrupted (through the API: same weights)."""
    ref = tmp_path_factory.mktemp("ref") / "ref"
    cfg = finetune_cfg(steps=6, save_every=2, max_grad_norm=0.5)
    run_finetune(str(tiny_llama_session), ref, YARN2, cfg)
    return ref


@pytest.mark.slow
def test_nan_stops_with_the_checkpoint_intact_and_resumable(
    tmp_path, tiny_llama_session, capsys, monkeypatch, reference_run
):
    out = tmp_path / "nan"
    monkeypatch.setenv("CTXEXT_INJECT_NAN_AT_STEP", "5")
    code, _, err = run_cli(capsys, *_nan_flags(tiny_llama_session, out))
    assert code == 1, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: training diverged at step 5: the loss is nan")
    last = work_dir(out) / "checkpoints" / "step-000004"
    assert str(last) in line and "--resume" in line and "Traceback" not in err
    assert not out.exists()
    log = [json.loads(x) for x in (work_dir(out) / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # the diverged step is not logged
    monkeypatch.delenv("CTXEXT_INJECT_NAN_AT_STEP")
    code, stdout, err = run_cli(capsys, *_nan_flags(tiny_llama_session, out), "--resume", "--json")
    assert code == 0, err
    assert json.loads(stdout)["resumed_from_step"] == 4
    # The NaN step changed nothing: the weights are those of the uninterrupted run.
    assert max_weight_diff(model_weights(out), model_weights(reference_run)) <= 1e-6
    prov = json.loads((out / "ctxext_provenance.json").read_text())
    assert prov["finetune"]["max_grad_norm"] == 0.5
    log = [json.loads(x) for x in (out / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in log)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "flip-a-byte"])
def test_damaged_checkpoint_is_skipped_on_resume(
    tmp_path, tiny_llama_session, capsys, monkeypatch, reference_run, damage
):
    out = tmp_path / "o"
    monkeypatch.setenv("CTXEXT_INJECT_NAN_AT_STEP", "5")
    assert run_cli(capsys, *_nan_flags(tiny_llama_session, out))[0] == 1
    monkeypatch.delenv("CTXEXT_INJECT_NAN_AT_STEP")
    weights = work_dir(out) / "checkpoints" / "step-000004" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncate":  # a disk that filled up, a copy cut short
        weights.write_bytes(data[: len(data) // 2])
    else:  # same size, one bit of one weight changed
        data[-5] ^= 0x01
        weights.write_bytes(bytes(data))
    code, stdout, err = run_cli(capsys, *_nan_flags(tiny_llama_session, out), "--resume", "--json")
    assert code == 0, err
    warning = [line for line in err.splitlines() if "step-000004" in line]
    assert len(warning) == 1 and "skipping damaged checkpoint" in warning[0]
    assert "model.safetensors" in warning[0] and "resuming from step-000002" in warning[0]
    assert json.loads(stdout)["resumed_from_step"] == 2
    assert max_weight_diff(model_weights(out), model_weights(reference_run)) <= 1e-6


def test_checkpoint_problem_reads_safetensors_headers_without_a_manifest(tmp_path):
    from safetensors.torch import save_file

    ckpt = tmp_path / "step-000001"
    ckpt.mkdir()
    save_file({"w": torch.ones(64, 64)}, str(ckpt / "model.safetensors"))
    assert checkpoint_problem(ckpt) is None
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    assert "is truncated" in checkpoint_problem(ckpt)


def test_checkpoint_of_tied_weights_is_quiet_and_reloads_them_tied(
    tmp_path, tiny_tokenizer_dir, capfd, caplog
):
    """accelerate's "Removed shared tensor {'lm_head.weight'}" note is not printed at each
    checkpoint of a model with tied embeddings, and the checkpoint restores both names."""
    from accelerate import Accelerator
    from conftest import build_tiny_model
    from transformers import AutoModelForCausalLM

    from ctxext.finetune.state import TrainerState, save_checkpoint

    path = build_tiny_model(tmp_path / "tied", tiny_tokenizer_dir, tie_word_embeddings=True)

    def tied_model():
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        return model

    acc = Accelerator(cpu=True)
    saved = acc.prepare(tied_model())
    with torch.no_grad():
        saved.model.embed_tokens.weight.add_(0.25)  # not what a fresh load has
    capfd.readouterr()
    with caplog.at_level("WARNING"):
        ckpt = save_checkpoint(acc, tmp_path / "work", TrainerState(step=1))
    err = capfd.readouterr().err + caplog.text
    assert "shared tensor" not in err, err
    resumed = Accelerator(cpu=True)  # as a resumed run: a fresh model, then the checkpoint
    loaded = resumed.prepare(tied_model())
    resumed.load_state(str(ckpt))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, saved.lm_head.weight)
