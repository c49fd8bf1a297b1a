"""`ctxext finetune`: real (tiny) training runs, PoSE positions, resume after SIGKILL, 2-process DP.

Every run trains a tiny Llama (hidden 64, 2 layers, vocab 320, trained length 128) built by
conftest, on the stdlib corpus, for a handful of steps on CPU.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model, run_cli
from safetensors.torch import load_file

from ctxext.config import ExtendConfig
from ctxext.finetune import (
    LOG_FILE,
    FinetuneConfig,
    PackedSamples,
    newest_checkpoint,
    pose_position_ids,
    run_finetune,
    work_dir,
)

ROOT = Path(__file__).resolve().parents[1]
CLI_MODULE = "ctxext"
CLI = [sys.executable, "-m", CLI_MODULE]
YARN4 = ExtendConfig(method="yarn", factor=4)  # 128 -> 512
YARN2 = ExtendConfig(method="yarn", factor=2)  # 128 -> 256


def _cfg(**kw) -> FinetuneConfig:
    base = {"steps": 4, "lr": 1e-3, "warmup_steps": 1, "save_every": 0}
    return FinetuneConfig(**{**base, **kw})


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _env() -> dict[str, str]:
    # Subprocesses import this checkout and use this process's thread count, so that their
    # float sums run in the same order as the in-process reference runs (bitwise comparable).
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}


# --------------------------------------------------------------------------- PoSE


def test_pose_positions_increase_and_cover_the_target():
    L, W = 512, 64
    seen = set()
    for i in range(3000):
        pos, split = pose_position_ids(L, W, random.Random(i))
        assert len(pos) == W
        assert all(b > a for a, b in itertools.pairwise(pos))  # strictly increasing
        assert pos[0] == 0 and pos[-1] <= L - 1
        assert pos[:split] == list(range(split))  # first chunk keeps its positions
        assert 1 <= split <= (W + 1) // 2
        seen.update(pos)
    assert max(seen) == L - 1
    assert len(seen) == L  # the windows reach (almost) every position of the target


def test_pose_samples_read_the_text_at_their_positions():
    chunks = torch.arange(3 * 512).view(3, 512)
    ds = PackedSamples(chunks, start=0, count=50, seed=1, window=64)
    for k in range(len(ds)):
        s = ds[k]
        pos = s["position_ids"]
        row = chunks[ds.chunk_index(k)]
        assert torch.equal(s["input_ids"], row[pos])  # true text distances are kept
        jumps = (pos.diff() != 1).nonzero().flatten()
        assert len(jumps) <= 1
        for j in jumps.tolist():  # no label across the skip
            assert s["labels"][j + 1] == -100
        assert (s["labels"] != -100).sum() >= 63
        assert s["attention_mask"].all()
    # Deterministic: the same sample number gives the same sample in a fresh dataset.
    again = PackedSamples(chunks, start=7, count=1, seed=1, window=64)[0]
    assert torch.equal(again["position_ids"], ds[7]["position_ids"])


def test_pose_attention_crosses_the_skip(tiny_llama_session):
    """transformers must not read the position jump as a new packed sequence."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_session).eval()
    chunks = torch.randint(3, 300, (1, 512))
    s = PackedSamples(chunks, start=0, count=1, seed=3, window=64)[0]
    split = int((s["position_ids"].diff() != 1).nonzero()[0]) + 1
    batch = {k: s[k][None] for k in ("input_ids", "position_ids", "attention_mask")}
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][0, 0] = (changed["input_ids"][0, 0] + 1) % 300
    with torch.no_grad():
        a, b = model(**batch).logits, model(**changed).logits
    assert (a[0, split:] - b[0, split:]).abs().max() > 1e-4


# --------------------------------------------------------------------------- outputs


def test_full_finetune_writes_a_plain_extended_checkpoint(tmp_path, tiny_llama_session, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "ft"
    code, stdout, err = run_cli(
        capsys, "finetune", tiny_llama_session, "-o", out, "--method", "yarn",
        "--factor", "4", "--steps", "3", "--lr", "1e-3", "--warmup-steps", "1", "--json",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["steps"] == 3 and summary["target_length"] == 512
    assert summary["tokens"] == 3 * 512 and summary["final_loss"] > 0
    # config.json is byte-for-byte what `ctxext extend` writes.
    ext = tmp_path / "ext"
    assert run_cli(capsys, "extend", tiny_llama_session, "-o", ext, "-m", "yarn", "-f", "4")[0] == 0
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (ext / "config.json").read_text()
    )
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 512
    model = AutoModelForCausalLM.from_pretrained(out)  # vanilla transformers
    assert model.config.rope_parameters["rope_type"] == "yarn"
    assert model.config.rope_parameters["factor"] == 4.0
    assert AutoTokenizer.from_pretrained(out).model_max_length == 512
    assert _max_diff(_weights(out), _weights(tiny_llama_session)) > 1e-4  # it trained
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert set(log[0]) >= {"step", "loss", "lr", "tokens", "tokens_per_s", "elapsed"}
    assert (out / "loss.png").stat().st_size > 1000
    prov = json.loads((out / "ctxext_provenance.json").read_text())
    assert prov["tool"] == "ctxext finetune" and prov["method"] == "yarn"
    assert not work_dir(out).exists()


def test_lora_merges_into_a_plain_checkpoint(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoModelForCausalLM

    base = build_tiny_model(tmp_path / "tied", tiny_tokenizer_dir, tie_word_embeddings=True)
    out = tmp_path / "lora"
    summary = run_finetune(str(base), out, YARN2, _cfg(lora_rank=4, pose=True, train_length=64))
    assert summary["trainable_parameters"] < summary["parameters"]
    merged, before = _weights(out), _weights(base)
    assert not any("lora" in k for k in merged)
    assert merged.keys() == before.keys()
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert (merged[key] - before[key]).abs().max() > 1e-5  # adapters merged in
    assert (
        merged["model.embed_tokens.weight"] - before["model.embed_tokens.weight"]
    ).abs().max() > 0
    assert (merged["model.norm.weight"] - before["model.norm.weight"]).abs().max() > 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings and model.config.max_position_embeddings == 256

    # Adapters only: embeddings and norms stay as they were.
    out2 = tmp_path / "lora-only"
    run_finetune(str(base), out2, YARN2, _cfg(steps=2, lora_rank=4, lora_trainable="none"))
    w = _weights(out2)
    assert torch.equal(w["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert torch.equal(w["model.norm.weight"], before["model.norm.weight"])


def test_rebuilt_model_merges_like_the_trained_one(tiny_tokenizer_dir, tmp_path):
    """The FSDP output path (gathered state dict -> fresh CPU copy) equals the direct one."""
    from ctxext.finetune import prepare_model, rebuild_model
    from ctxext.modeling import load_causal_lm

    base = build_tiny_model(tmp_path / "tied", tiny_tokenizer_dir, tie_word_embeddings=True)
    cfg = _cfg(lora_rank=4)
    loaded = load_causal_lm(str(base), extend=YARN2, dtype="float32")
    model, _, _ = prepare_model(loaded.model, cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))  # as if trained: adapters, embeddings, norms
    rebuilt = rebuild_model(loaded.config, cfg, model.state_dict())
    ids = torch.randint(3, 300, (1, 200))
    with torch.no_grad():
        expected = model.merge_and_unload().eval()(ids).logits
        got = rebuilt.merge_and_unload().eval()(ids).logits
    assert torch.allclose(expected, got, atol=1e-5)


def test_extended_checkpoint_is_finetuned_at_its_length(tmp_path, tiny_llama_session, capsys):
    ext = tmp_path / "ext"
    assert (
        run_cli(capsys, "extend", tiny_llama_session, "-o", ext, "-m", "linear", "-f", "2")[0] == 0
    )
    summary = run_finetune(str(ext), tmp_path / "ft", None, _cfg(steps=1, grad_ckpt=True))
    assert (summary["method"], summary["factor"], summary["target_length"]) == ("linear", 2.0, 256)


def test_grad_accum_matches_a_bigger_batch(tmp_path, tiny_llama_session):
    a = run_finetune(str(tiny_llama_session), tmp_path / "a", YARN2, _cfg(batch_size=2))
    b = run_finetune(
        str(tiny_llama_session), tmp_path / "b", YARN2, _cfg(batch_size=1, grad_accum=2)
    )
    assert a["global_batch"] == b["global_batch"] == 2
    assert _max_diff(_weights(tmp_path / "a"), _weights(tmp_path / "b")) < 1e-5


# --------------------------------------------------------------------------- faults


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


@CPU_ONLY
@pytest.mark.parametrize("streamed", [False, True], ids=["stdlib", "streamed-dataset"])
def test_resume_after_sigkill_gives_the_same_weights(tmp_path, tiny_llama_session, streamed):
    args = ["--method", "yarn", "--factor", "2", "--steps", "24", "--lr", "1e-3",
            "--warmup-steps", "3", "--lr-schedule", "cosine", "--save-every", "3", "--seed", "5"]  # fmt: skip
    data = {}
    if streamed:  # a seeded shuffle buffer over a stream: resuming must rebuild the same samples
        data = {"data": str(stdlib_dataset(tmp_path / "ds")), "shuffle_buffer": 8}
        args += ["--data", data["data"], "--shuffle-buffer", "8"]
    cfg = FinetuneConfig(
        steps=24, lr=1e-3, warmup_steps=3, lr_schedule="cosine", save_every=3, seed=5, **data
    )
    ref = tmp_path / "ref"
    ref_summary = run_finetune(str(tiny_llama_session), ref, YARN2, cfg)
    assert ref_summary["data"]["split"] == ("train" if streamed else None)

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [*CLI, "finetune", str(tiny_llama_session), "-o", str(out), *args],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while newest_checkpoint(work_dir(out)) is None and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
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
    assert _max_diff(_weights(out), _weights(ref)) <= 1e-6
    steps = [json.loads(x)["step"] for x in (out / "training_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 25))  # no step logged twice, none missing


@CPU_ONLY
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tiny_llama_session):
    single = tmp_path / "one"
    run_finetune(str(tiny_llama_session), single, YARN2, _cfg(steps=3, batch_size=2))
    multi = tmp_path / "two"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_cpu_threads_per_process", "1", "-m", CLI_MODULE, "finetune",
        str(tiny_llama_session), "-o", str(multi), "--method", "yarn", "--factor", "2",
        "--steps", "3", "--lr", "1e-3", "--warmup-steps", "1", "--save-every", "2",
        "--batch-size", "1", "--json",
    ]  # fmt: skip
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout[res.stdout.index("{") :])  # printed once (main process)
    assert summary["num_processes"] == 2 and summary["global_batch"] == 2
    assert _max_diff(_weights(multi), _weights(single)) < 1e-5
    log_one = [json.loads(x) for x in (single / "training_log.jsonl").read_text().splitlines()]
    log_two = [json.loads(x) for x in (multi / "training_log.jsonl").read_text().splitlines()]
    for a, b in zip(log_one, log_two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--steps", "0"], "steps"),
        (["--lora-rank", "0"], "lora_rank"),
        (["--pose"], "train_length"),
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


def test_too_little_data_says_how_many_tokens(tmp_path, tiny_llama_session, capsys):
    text = tmp_path / "small.txt"
    text.write_text("def f(x):\n    return x\n" * 10)
    code, _, err = run_cli(
        capsys, "finetune", tiny_llama_session, "-o", tmp_path / "o", "-m", "yarn", "-f", "4",
        "--data", text, "--batch-size", "2",
    )  # fmt: skip
    assert code == 2 and err.count("\n") == 1
    assert "needs at least 1,024" in err
    assert not (tmp_path / "o").exists() and not work_dir(tmp_path / "o").exists()


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
        run_finetune(model, out, YARN2, _cfg(steps=4, save_every=2), progress=crash)
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


# --------------------------------------------------------------------------- guard rails


def _nan_flags(model: Path, out: Path) -> list:
    return ["finetune", model, "-o", out, "-m", "yarn", "-f", "2", "--steps", "6", "--lr",
            "1e-3", "--warmup-steps", "1", "--save-every", "2", "--max-grad-norm", "0.5"]  # fmt: skip


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_llama_session) -> Path:
    """The same six steps as _nan_flags, never interrupted (through the API: same weights)."""
    ref = tmp_path_factory.mktemp("ref") / "ref"
    cfg = _cfg(steps=6, save_every=2, max_grad_norm=0.5)
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
    assert _max_diff(_weights(out), _weights(reference_run)) <= 1e-6
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
    assert _max_diff(_weights(out), _weights(reference_run)) <= 1e-6


def test_checkpoint_problem_reads_safetensors_headers_without_a_manifest(tmp_path):
    from safetensors.torch import save_file

    from ctxext.finetune import checkpoint_problem

    ckpt = tmp_path / "step-000001"
    ckpt.mkdir()
    save_file({"w": torch.ones(64, 64)}, str(ckpt / "model.safetensors"))
    assert checkpoint_problem(ckpt) is None
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    assert "is truncated" in checkpoint_problem(ckpt)


@pytest.mark.slow
def test_two_finetunes_to_one_output_refuse_the_second(tmp_path, tiny_llama_session):
    out = tmp_path / "shared"
    args = [*CLI, "finetune", str(tiny_llama_session), "-o", str(out), "-m", "yarn", "-f", "2",
            "--steps", "100000", "--save-every", "0"]  # fmt: skip
    first = subprocess.Popen(
        args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        lock = tmp_path / ".shared.lock"
        deadline = time.time() + 120
        while not (lock.is_file() and lock.read_text().startswith("pid")):
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.05)
        second = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "is being written by another ctxext run" in lines[0]
        assert f"pid {first.pid}" in lines[0]
        assert first.poll() is None  # the first run is untouched
        first.send_signal(signal.SIGINT)
        _, first_err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 130, first_err
    assert not lock.exists()  # released on exit


def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path, tiny_llama_session, capsys):
    out = tmp_path / "o"
    lock = tmp_path / ".o.lock"
    holder = subprocess.Popen(  # holds the lock as a real run does, then is killed
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from ctxext.checkpoint import output_lock\n"
         "with output_lock(Path(sys.argv[1])):\n print('locked', flush=True); time.sleep(600)",
         str(out)],
        env=_env(), stdout=subprocess.PIPE, text=True,
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
