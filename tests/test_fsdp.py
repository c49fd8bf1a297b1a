"""FSDP2 fine-tuning on 2 CPU processes (gloo), launched with the shipped accelerate config.

What runs is the user's command: ``accelerate launch --config_file
ctxext/accelerate_configs/fsdp_cpu_2proc.yaml -m ctxext finetune ...``. Each launch trains the
tiny Llama from conftest (hidden 64, 2 layers, trained length 128) extended yarn x2, 1 thread
per process. Compared against a 1-process run with the same global batch, seed and data:
per-step losses within 1e-4 relative, final weights within 1e-4 (relative to each tensor's
largest entry). The full fine-tune is one run checked several ways: its rank 1 is SIGKILLed
after the first checkpoint, it is resumed, and the resumed run must end with the losses and
weights of one process's uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import finish_together, run_cli
from safetensors.torch import load_file

from ctxext.config import ExtendConfig, FinetuneConfig
from ctxext.finetune.loop import run_finetune
from ctxext.finetune.state import newest_checkpoint, work_dir
from ctxext.fsdp import SHARDS_DIR

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "ctxext" / "accelerate_configs"
CPU_CONFIG = CONFIGS / "fsdp_cpu_2proc.yaml"
YARN2 = ExtendConfig(method="yarn", factor=2)  # 128 -> 256

# Full fine-tune with PoSE (64-token windows over 256 positions) and gradient checkpointing;
# sharded checkpoints every 3 steps. 10 steps: the kill test needs steps left after step 3.
FULL = {"steps": 10, "lr": 1e-3, "warmup_steps": 2, "lr_schedule": "cosine", "seed": 3,
        "pose": True, "train_length": 64, "grad_ckpt": True, "save_every": 3}  # fmt: skip
LORA = {"steps": 5, "lr": 1e-3, "warmup_steps": 1, "seed": 4, "lora_rank": 4, "grad_accum": 2,
        "grad_ckpt": True, "pose": True, "train_length": 64, "save_every": 2}  # fmt: skip

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU processes (gloo); on GPUs Accelerate shards itself"
)


def _flags(opts: dict) -> list[str]:
    out = []
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        out += [flag] if value is True else [flag, str(value)]
    return out


def _launch_cmd(model: Path, out: Path, opts: dict, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG),
        "--num_cpu_threads_per_process", "1", "--main_process_port", str(_free_port()),
        "-m", "ctxext", "finetune", str(model), "-o", str(out), "--method", "yarn",
        "--factor", "2", "--batch-size", "1", *_flags(opts), "--json", *extra,
    ]  # fmt: skip


def _free_port() -> int:
    # Other test runs on this machine may hold the default 29500.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _launch(model: Path, out: Path, opts: dict, *extra: str) -> dict:
    res = subprocess.run(
        _launch_cmd(model, out, opts, *extra),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout[res.stdout.index("{") :])  # printed once (main process)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest |a - b| of any tensor, relative to that tensor's largest |b|."""
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in a)


def _losses(path: Path) -> list[float]:
    lines = (path / "training_log.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def _single(model: Path, out: Path, opts: dict) -> None:
    """The 1-process reference: 2 sequences per micro-step (both ranks' together), the same
    accumulation, so the same global batch and samples per optimizer step."""
    run_finetune(str(model), out, YARN2, FinetuneConfig(**{**opts, "batch_size": 2}))


def _rank_pid(launcher: int, rank: str) -> int | None:
    """The pid of the worker process with RANK=rank under the launcher (torchrun's agent)."""
    import psutil

    for child in psutil.Process(launcher).children(recursive=True):
        try:
            if child.environ().get("RANK") == rank and "ctxext" in " ".join(child.cmdline()):
                return child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def _launch_and_kill_rank_1(model: Path, out: Path, opts: dict) -> tuple[int, str]:
    """Launch the fine-tune and SIGKILL rank 1 once the first checkpoint is on disk: the
    launcher's return code and stderr."""
    proc = subprocess.Popen(
        _launch_cmd(model, out, opts),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        while newest_checkpoint(work_dir(out)) is None and proc.poll() is None:
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        pid = _rank_pid(proc.pid, "1")
        assert pid is not None, "rank 1 not found (did the run end already?)"
        os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=120)  # the launcher sees rank 1 die and stops rank 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, proc.stderr.read().decode()


@pytest.fixture(scope="module")
def fsdp_full(tiny_llama_session, tmp_path_factory) -> dict:
    """One full FSDP fine-tune checked several ways (a launch is ~15 CPU-seconds of start-up):
    rank 1 is SIGKILLed after the first sharded checkpoint, what the kill left is recorded,
    then ``--resume`` finishes the run. The finished run must equal one process's
    uninterrupted run (test_fsdp_full_finetune_equals_one_process), which it can only do if the
    resume restored the weights, optimizer, schedule and data position of the kill."""
    out = tmp_path_factory.mktemp("fsdp") / "full"
    returncode, stderr = _launch_and_kill_rank_1(tiny_llama_session, out, FULL)
    ckpt = newest_checkpoint(work_dir(out))
    killed = {"returncode": returncode, "stderr": stderr, "output_existed": out.exists()}
    if ckpt is not None:
        killed["checkpoint"] = ckpt.name
        killed["shards"] = sorted(p.name for p in (ckpt / SHARDS_DIR).glob("*.distcp"))
        killed["gathered"] = [
            p.name for p in [*ckpt.glob("*.safetensors"), *ckpt.glob("optimizer*")]
        ]
    summary = _launch(tiny_llama_session, out, FULL, "--resume")
    return {"out": out, "killed": killed, "summary": summary}


def _assert_same_training(fsdp_out: Path, single_out: Path, steps: int) -> None:
    one, two = _losses(single_out), _losses(fsdp_out)
    assert len(one) == len(two) == steps
    for a, b in zip(one, two, strict=True):
        assert b == pytest.approx(a, rel=1e-4)
    assert _rel_diff(_weights(fsdp_out), _weights(single_out)) < 1e-4


def _assert_plain_checkpoint(out: Path, reference: Path) -> None:
    """Loads with vanilla transformers: no peft, no FSDP wrappers, the same keys and config."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())  # not DTensor
    keys = set(_weights(out))
    assert keys == set(_weights(reference))
    assert not [k for k in keys if "lora" in k or "base_model" in k or "_fsdp" in k]
    assert not [k for k in keys if "checkpoint_wrapped" in k or "_orig_mod" in k]
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (reference / "config.json").read_text()
    )
    assert not work_dir(out).exists()


@pytest.mark.slow
def test_fsdp_full_finetune_equals_one_process(fsdp_full, tiny_llama_session, tmp_path):
    """Every step's loss (before the kill and after the resume) and the final weights equal
    one uninterrupted process's."""
    out, summary = fsdp_full["out"], fsdp_full["summary"]
    assert summary["fsdp"] == "ctxext-cpu"  # sharded, not silently data-parallel
    assert summary["num_processes"] == 2 and summary["global_batch"] == 2
    single = tmp_path / "single"
    _single(tiny_llama_session, single, FULL)
    _assert_same_training(out, single, FULL["steps"])
    _assert_plain_checkpoint(out, single)


@pytest.mark.slow
def test_fsdp_lora_equals_one_process(tiny_llama_session, tmp_path):
    out = tmp_path / "lora"
    summary = _launch(tiny_llama_session, out, LORA)
    assert summary["fsdp"] == "ctxext-cpu"
    assert summary["trainable_parameters"] < summary["parameters"]
    single = tmp_path / "single"
    _single(tiny_llama_session, single, LORA)
    _assert_same_training(out, single, LORA["steps"])
    _assert_plain_checkpoint(out, single)
    base = _weights(tiny_llama_session)
    merged = _weights(out)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert (merged[key] - base[key]).abs().max() > 1e-5  # the adapters were merged in


@pytest.mark.slow
def test_fsdp_resume_after_sigkill_of_one_rank(fsdp_full):
    """The kill stops the run with no output and a sharded checkpoint; --resume continues from
    it (and ends with one process's weights: the test above)."""
    killed, summary, out = fsdp_full["killed"], fsdp_full["summary"], fsdp_full["out"]
    assert killed["returncode"] != 0 and "SIGKILL" in killed["stderr"], killed["stderr"][-3000:]
    assert not killed["output_existed"]  # the output appears only when training is done
    killed_at = int(killed["checkpoint"].split("-")[1])
    assert 3 <= killed_at < FULL["steps"]
    # The checkpoint is sharded: one model+optimizer file per rank, no gathered weights.
    assert killed["shards"] == ["__0_0.distcp", "__1_0.distcp"]
    assert killed["gathered"] == []
    assert summary["resumed_from_step"] == killed_at
    steps = [json.loads(x)["step"] for x in (out / "training_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, FULL["steps"] + 1))


# --------------------------------------------------------------------------- refusals, configs


def test_context_parallelism_off_cuda_is_refused_in_one_line(
    tiny_llama_session, tmp_path, capsys, monkeypatch, calibrated
):
    # calibrated (here and below): the default 400 steps are long by the pessimistic guess,
    # so the pre-run check would measure the machine before the refusal.
    # What `accelerate launch` exports for parallelism_config_cp_size: 2.
    monkeypatch.setenv("PARALLELISM_CONFIG_CP_SIZE", "2")
    out = tmp_path / "o"
    code, _, err = run_cli(
        capsys, "finetune", tiny_llama_session, "-o", out, "-m", "yarn", "-f", "2"
    )
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "context parallelism" in err and "CUDA" in err and "cpu" in err
    assert not out.exists() and not work_dir(out).exists()


#: FSDP options CPU processes cannot run: fsdp_version -> (flags, what the refusal says).
REFUSED = {"1": ([], "FSDP2 only"), "2": (["--dtype", "bfloat16"], "trains in float32")}


@pytest.fixture(scope="module")
def refusals(tiny_llama_session, tmp_path_factory, calibration, calibration_dir) -> dict:
    """Each case of REFUSED as `accelerate launch` exports it for an FSDP config (a world of one
    CPU process, so Accelerate picks MULTI_CPU as with more), in its own process; the processes
    run at the same time (most of each is imports). With the session calibration: the default
    400 steps are long by the pessimistic guess, so the pre-run check would measure first."""
    env = {k: v for k, v in _env().items() if k != "CTXEXT_MEMORY_LIMIT"}
    env["CTXEXT_CACHE_DIR"] = str(calibration_dir)
    started, outs = {}, {}
    for version, (flags, _) in REFUSED.items():
        out = tmp_path_factory.mktemp(f"refused-v{version}") / "o"
        launcher = {
            "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": version, "LOCAL_RANK": "0",
            "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
        }  # fmt: skip
        cmd = [sys.executable, "-m", "ctxext", "finetune", str(tiny_llama_session), "-o",
               str(out), "-m", "yarn", "-f", "2", *flags]  # fmt: skip
        started[version] = subprocess.Popen(
            cmd, env={**env, **launcher}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        outs[version] = out
    done = finish_together(started, timeout=120)
    return {version: (res.returncode, res.stderr, outs[version]) for version, res in done.items()}


@pytest.mark.parametrize("version", list(REFUSED))
def test_fsdp_options_cpu_processes_cannot_run_are_refused_in_one_line(refusals, version):
    """fsdp_version 1, or bf16 compute."""
    returncode, stderr, out = refusals[version]
    needle = REFUSED[version][1]
    assert returncode == 2, stderr[-3000:]
    lines = [x for x in stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], stderr[-3000:]
    assert "Traceback" not in stderr
    assert not out.exists() and not work_dir(out).exists()


@pytest.mark.parametrize(
    ("name", "processes", "machines", "cpu"),
    [("fsdp_cpu_2proc", 2, 1, True), ("fsdp_8gpu", 8, 1, False), ("fsdp_2node_8gpu", 16, 2, False)],
)
def test_shipped_accelerate_configs_parse(name, processes, machines, cpu):
    """Accelerate's own config loader and launcher read each file into FSDP2 settings."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DistributedType
    from accelerate.utils.launch import prepare_multi_gpu_env

    path = CONFIGS / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type == DistributedType.FSDP
    assert (config.num_processes, config.num_machines, bool(config.use_cpu)) == (
        processes,
        machines,
        cpu,
    )
    assert config.fsdp_config["fsdp_version"] == 2
    assert config.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "ctxext"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "LlamaDecoderLayer"
    assert env["FSDP_ACTIVATION_CHECKPOINTING"] == "false"


def test_accelerate_configs_are_packaged():
    from importlib.resources import files

    shipped = {p.name for p in (files("ctxext") / "accelerate_configs").iterdir()}
    assert {"fsdp_cpu_2proc.yaml", "fsdp_8gpu.yaml", "fsdp_2node_8gpu.yaml"} <= shipped


def test_fsdp_shards_a_moe_model_experts_included(tmp_path):
    """Mixtral on 2 CPU processes: each decoder layer (attention, router and the stacked
    expert weights) is one FSDP unit, and the result equals one process's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "arch_matrix", ROOT / "benchmarks" / "arch_matrix.py"
    )
    matrix = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(matrix)
    model = matrix.build("mixtral", tmp_path / "mixtral")
    opts = {"steps": 2, "lr": 1e-3, "warmup_steps": 1, "seed": 3, "train_length": 64, "pose": True}
    out = tmp_path / "fsdp"
    # The user names the model's decoder layer class in the shipped config (docs/finetune.md).
    config = tmp_path / "fsdp_mixtral.yaml"
    config.write_text(CPU_CONFIG.read_text().replace("LlamaDecoderLayer", "MixtralDecoderLayer"))
    cmd = _launch_cmd(model, out, opts)
    cmd[cmd.index(str(CPU_CONFIG))] = str(config)
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-4000:]
    summary = json.loads(res.stdout[res.stdout.index("{") :])
    assert summary["steps"] == 2
    single = tmp_path / "single"
    _single(model, single, opts)
    got, want = _weights(out), _weights(single)
    assert any("experts" in k for k in got)
    assert _rel_diff(got, want) < 1e-4
