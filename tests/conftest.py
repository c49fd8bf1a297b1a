"""Shared fixtures: tiny real checkpoints built in the test session (no downloads)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ctxext.cli.app import main
from ctxext.resources.threads import apply_policy, usable_cores

# The tests run under the thread wait policy the CLI applies on shared cores (see
# ctxext.resources.threads): the suite's subprocesses run beside its own torch threads, so its
# cores are shared by construction. torch is not imported yet here, so it still takes effect;
# without it the threads spin beside the subprocesses and the suite costs far more CPU.
assert "torch" not in __import__("sys").modules
apply_policy(busy=True)


def _threads_per_worker() -> None:
    """Under pytest-xdist (README's test command runs ``-n auto``), each worker gets its share
    of the cores as torch threads, so the workers do not oversubscribe them: set before torch
    starts, and inherited by the CLI subprocesses the tests start. A user's OMP_NUM_THREADS
    is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, usable_cores() // workers))


_threads_per_worker()

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GUTENBERG = SHARED / "corpus" / "gutenberg"
BUNDLED = Path(__file__).resolve().parents[1] / "ctxext" / "bundled" / "stdlib-llama"

#: A fine-tune's progress line once it trains (stderr not a terminal, CTXEXT_PROGRESS_INTERVAL=0):
#: the tests that interrupt a training run wait for it.
FINETUNE_STEP_LINE = re.compile(r"^finetune.*: [\d,]+/[\d,]+ steps")

TINY_SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


#: The modules that cost the most (CPU-seconds per module, `pytest --durations` and a CPU
#: profile, 2026-12-07), most first. README's test command runs the suite on every core with
#: pytest-xdist's ``--dist loadscope`` (a module runs whole on one worker, so its module-scoped
#: fixtures are built once): the long modules started first end together instead of one worker
#: finishing the last of them alone. Order only; every other module keeps collection order.
HEAVY_FIRST = (
    "test_fsdp.py",
    "test_hub.py",
    "test_arch_matrix.py",
    "test_recipes_runner.py",
    "test_finetune_state.py",
    "test_shipped_recipes.py",
    "test_bundled.py",
    "test_faults.py",
    "test_resources_load.py",
    "test_finetune_loop.py",
    "test_cli_plan.py",
    "test_evaluate_reference.py",
    "test_tune_run.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within kept


def pytest_collection_finish(session: pytest.Session) -> None:
    """llama.cpp's converter is downloaded while the tests before test_gguf_interop.py's run,
    when any of those is to run (see its ``start_converter_download``). Not under pytest-xdist:
    every worker collects every test but only one runs that module, so it downloads when its
    tests need it."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    for item in [] if session.config.option.collectonly else session.items:
        if item.path.name == "test_gguf_interop.py":
            item.module.start_converter_download(session.config)
            return


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """The calibration cache (and any other ctxext cache) in a folder of this session, for the
    tests and the subprocesses they start: the user's ~/.cache/ctxext is never read or written,
    and every session measures this machine afresh, as a new user's first run does.

    The session's calibration lives in a folder of its own (``calibration``), which only the
    tests that ask for it (``calibrated``) see: with a calibration cached, every fine-tune
    checks its first steps against it and, the tiny models' steps being far off the estimate,
    measures the speeds again (a few seconds each time)."""
    path = tmp_path_factory.mktemp("ctxext-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CTXEXT_CACHE_DIR", str(path))
        yield path


@pytest.fixture(autouse=True)
def _no_calibration_by_accident(_isolated_cache):
    """A test that measured this machine into the shared cache (~30 s) asks for ``calibrated``
    instead; the calibration is removed so the next test does not inherit it."""
    yield
    left = list(_isolated_cache.glob("calibration-*.json"))
    for path in left:
        path.unlink()
    assert not left, "this test measured the machine: request the `calibrated` fixture"


@pytest.fixture(scope="session")
def calibration_dir(tmp_path_factory) -> Path:
    """The session's calibration cache (see ``_isolated_cache``)."""
    return tmp_path_factory.mktemp("ctxext-calibration")


@pytest.fixture(scope="session")
def calibration(_isolated_cache, calibration_dir, tmp_path_factory):  # -> timing.Calibration
    """This machine, measured once per run into ``calibration_dir`` (~30 s on a quiet machine;
    under xdist by the first worker that needs it, see ``_shared_calibration``) as rank 0 of
    `accelerate launch` measures it: with the variables torchrun exports to its workers set.
    The port they name is held by a socket here, so a runtime probe that joined the launcher's
    process group fails at once (address in use) instead of waiting for a rank 1 until it is
    killed; see test_resources_calibrate.py."""
    import socket

    from ctxext.resources import calibrate

    with (
        _shared_calibration(tmp_path_factory, calibration_dir),
        socket.socket() as held,
        pytest.MonkeyPatch.context() as mp,
    ):
        held.bind(("127.0.0.1", 0))
        held.listen()
        for key, value in launcher_env(rank=0, port=held.getsockname()[1]).items():
            mp.setenv(key, value)
        mp.setenv("CTXEXT_CACHE_DIR", str(calibration_dir))
        return calibrate.load_calibration()


@contextmanager
def _shared_calibration(tmp_path_factory, calibration_dir: Path) -> Iterator[None]:
    """Under pytest-xdist, the first worker to need the calibration measures it (~10 CPU-s)
    and the others copy its file into their own ``calibration_dir`` (the workers run the same
    thread count, so the cache key is the same): one measurement per run, not per worker. The
    lock file and the measured copy live in the run's folder, which the workers share."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / "ctxext-calibration"
    shared.mkdir(exist_ok=True)
    with FileLock(shared / ".lock"):
        for path in shared.glob("calibration-*.json"):
            shutil.copy2(path, calibration_dir / path.name)
        yield
        for path in calibration_dir.glob("calibration-*.json"):
            shutil.copy2(path, shared / path.name)


@pytest.fixture
def calibrated(monkeypatch, calibration, calibration_dir):
    """The session's calibration, cached for this test (and the processes it starts), with the
    memory limit left to what is measured; put back afterwards if the test replaced it."""
    from ctxext.resources import calibrate

    monkeypatch.setenv("CTXEXT_CACHE_DIR", str(calibration_dir))
    monkeypatch.delenv("CTXEXT_MEMORY_LIMIT", raising=False)
    yield calibration
    if calibrate.cached_calibration() != calibration:  # a fine-tune measured the speeds again
        calibrate.save_calibration(calibration)


def launcher_env(rank: int, port: int) -> dict[str, str]:
    """What torchrun exports to the worker of ``rank`` in a world of two under `accelerate
    launch` with the shipped FSDP config (fsdp_cpu_2proc.yaml)."""
    env = {
        "RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": 2, "LOCAL_WORLD_SIZE": 2,
        "GROUP_RANK": 0, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
        "TORCHELASTIC_RUN_ID": "none", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": 2,
        "ACCELERATE_USE_CPU": "true",
    }  # fmt: skip
    return {k: str(v) for k, v in env.items()}


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A real byte-level BPE tokenizer (vocab 320) trained on a few stdlib files."""
    from ctxext.bundled_train import train_tokenizer
    from ctxext.corpus import stdlib_documents

    texts = [d.text for _, d in zip(range(20), stdlib_documents("train"), strict=False)]
    tok = train_tokenizer(texts, vocab_size=320)
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    return path


def build_tiny_model(path: Path, tokenizer_dir: Path, model_type: str = "llama", **overrides):
    """Save a randomly initialised tiny causal LM of ``model_type`` with a real tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    kwargs = {**TINY_SIZES, "vocab_size": len(tok), **overrides}
    config = AutoConfig.for_model(model_type, **kwargs)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_session(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("m") / "tiny-llama", tiny_tokenizer_dir)


@pytest.fixture
def tiny_llama(tmp_path, tiny_llama_session) -> Path:
    """A private copy of the tiny Llama checkpoint (tests may do anything to it)."""
    dst = tmp_path / "tiny-llama"
    shutil.copytree(tiny_llama_session, dst)
    return dst


def tree_hash(path: Path) -> str:
    """sha256 over every file's relative path and bytes (to prove an input is untouched)."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(p.relative_to(path).as_posix().encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run the real CLI entry point in-process; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


# --------------------------------------------------------------------------- fine-tune runs


def finetune_cfg(**kw: Any):  # -> FinetuneConfig
    """A short test fine-tune: 4 steps at lr 1e-3 after 1 warm-up step, no checkpoints."""
    from ctxext.config import FinetuneConfig

    base = {"steps": 4, "lr": 1e-3, "warmup_steps": 1, "save_every": 0}
    return FinetuneConfig(**{**base, **kw})


def model_weights(path: Path) -> dict:
    """The tensors of ``path``/model.safetensors."""
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def max_weight_diff(a: dict, b: dict) -> float:
    """The largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def subprocess_env() -> dict[str, str]:
    """Subprocesses import this checkout and use this process's thread count, so that their
    float sums run in the same order as the in-process reference runs (bitwise comparable)."""
    import torch

    root = Path(__file__).resolve().parents[1]
    return {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": str(torch.get_num_threads())}


def finish_together(
    started: dict[Any, subprocess.Popen], timeout: float
) -> dict[Any, subprocess.CompletedProcess]:
    """Wait for processes started together (stdout and stderr piped, as text): their results by
    key. Any still running when this fails is killed, never left behind."""
    done = {}
    try:
        for key, proc in started.items():
            out, err = proc.communicate(timeout=timeout)
            done[key] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        for proc in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return done
