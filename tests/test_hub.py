"""Hub models: each command downloads exactly the files it needs, from a fake Hub on 127.0.0.1.

The real huggingface_hub client (in a `ctxext` subprocess, because huggingface_hub reads
HF_ENDPOINT and HF_HUB_OFFLINE when it is imported) talks to tests/hub_server.py, which logs
every request. The repo holds the bundled model's config and tokenizer, its weights as two
safetensors shards with an index, and bait no command may touch: a pytorch_model.bin,
original/consolidated.00.pth and a .gguf.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import BUNDLED
from hub_server import FakeHub, FakeRepo, commit_sha, downloaded

ROOT = Path(__file__).resolve().parents[1]
MAIN = commit_sha("main")
V1 = commit_sha("v1")
CONFIG = {"config.json", "generation_config.json", "tokenizer_config.json"}
TOKENIZER = {*CONFIG, "tokenizer.json"}
SHARDS = {
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
}
BAIT = {"pytorch_model.bin", "original/consolidated.00.pth", "original/params.json",
        "stdlib-llama.Q8_0.gguf"}  # fmt: skip


@functools.cache
def _sharded_weights() -> dict[str, bytes]:
    """The bundled weights split into two safetensors shards plus the index transformers reads
    (made once: every repo and commit of the fake Hub holds the same; read only)."""
    from safetensors.torch import load_file, save

    tensors = load_file(str(BUNDLED / "model.safetensors"))
    names = sorted(tensors)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    files: dict[str, bytes] = {}
    weight_map = {}
    for i, part in enumerate(halves, start=1):
        shard = f"model-{i:05d}-of-00002.safetensors"
        files[shard] = save({k: tensors[k].contiguous() for k in part}, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    return files


def _repo_files(config_override: dict | None = None) -> dict[str, bytes]:
    files = {
        name: (BUNDLED / name).read_bytes()
        for name in ("config.json", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json")
    }  # fmt: skip
    if config_override:
        config = json.loads(files["config.json"]) | config_override
        files["config.json"] = json.dumps(config).encode()
    files |= _sharded_weights()
    files |= {name: f"bait: never download {name}".encode() for name in BAIT}
    files["README.md"] = b"# tiny\n"
    return files


@pytest.fixture(scope="module")
def hub():
    tiny = FakeRepo(
        commits={MAIN: _repo_files(), V1: _repo_files({"max_position_embeddings": 128})},
        refs={"main": MAIN, "v1": V1},
    )
    pickled_files = {k: v for k, v in _repo_files().items() if k not in SHARDS}
    repos = {
        "org/tiny": tiny,
        "org/gated": FakeRepo(commits={MAIN: _repo_files()}, refs={"main": MAIN}, gated=True),
        "org/pickled": FakeRepo(commits={MAIN: pickled_files}, refs={"main": MAIN}),
    }
    server = FakeHub(repos).start()
    yield server
    server.stop()


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "hf-home"


def ctxext(hub: FakeHub, cache: Path, *args: str, offline: bool = False, endpoint: str = ""):
    """Run the CLI in a subprocess against the fake Hub; returns (code, stdout, stderr, s)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env |= {
        "HF_ENDPOINT": endpoint or hub.url,
        "HF_HOME": str(cache),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "NO_PROXY": "127.0.0.1",
        "PYTHONPATH": str(ROOT),
    }
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "ctxext", *args], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    return proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - started


def _fetched(requests: list[tuple[str, str]]) -> set[str]:
    """Files whose bytes were downloaded (GET), and no file only looked at (HEAD) either."""
    got, looked = downloaded(requests, "GET"), downloaded(requests, "HEAD")
    assert looked <= got, looked - got
    return got


@dataclass
class Ran:
    """One command run against the fake Hub into a cache of its own, and what it asked for."""

    code: int
    stdout: str
    stderr: str
    requests: list[tuple[str, str]]
    cache: Path
    output: Path


def _run_once(hub: FakeHub, root: Path, *args: str) -> Ran:
    """``ctxext ARGS -o ROOT/out`` with an empty cache ROOT/hf-home: run once for every test
    that checks it (the command, its downloads and its output are the same for each)."""
    cache, output = root / "hf-home", root / "out"
    hub.clear()
    code, out, err, _ = ctxext(hub, cache, *args, "-o", str(output))
    return Ran(code, out, err, list(hub.requests), cache, output)


@pytest.fixture(scope="module")
def cold_extend(hub, tmp_path_factory) -> Ran:
    """`extend org/tiny -m yarn --factor 2` into an empty cache: what it fetched, wrote and
    printed, and the cache it filled (read offline afterwards)."""
    root = tmp_path_factory.mktemp("cold-extend")
    return _run_once(hub, root, "extend", "org/tiny", "-m", "yarn", "--factor", "2")


@pytest.fixture(scope="module")
def cold_eval(hub, tmp_path_factory) -> Ran:
    """`eval org/tiny -m yarn -m linear -f 2 --lengths 64,128` into an empty cache: base + 2
    methods x 2 lengths (what it fetched, and the cache a second run reads warm)."""
    root = tmp_path_factory.mktemp("cold-eval")
    return _run_once(hub, root, *EVAL_TWO_METHODS)


EVAL_TWO_METHODS = ["eval", "org/tiny", "-m", "yarn", "-m", "linear", "-f", "2", "--lengths",
                    "64,128", "--num-docs", "2"]  # fmt: skip


def test_inspect_and_dry_run_fetch_the_config_only(hub, cache):
    hub.clear()
    code, out, err, _ = ctxext(hub, cache, "inspect", "org/tiny", "--json")
    assert code == 0, err
    assert json.loads(out)["trained_length"] == 256
    assert _fetched(hub.requests) == CONFIG

    hub.clear()
    code, _, err, _ = ctxext(hub, cache, "extend", "org/tiny", "-m", "yarn", "--factor", "2",
                             "-o", str(cache.parent / "x"), "--dry-run")  # fmt: skip
    assert code == 0, err
    assert _fetched(hub.requests) <= CONFIG  # cached already: nothing more than the config files
    assert not (cache.parent / "x").exists()


def test_extend_fetches_only_safetensors_and_links_only_them(cold_extend):
    out = cold_extend.output
    assert cold_extend.code == 0, cold_extend.stderr
    assert _fetched(cold_extend.requests) == TOKENIZER | SHARDS
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert written == TOKENIZER | SHARDS | {"ctxext_provenance.json"}
    source = json.loads((out / "ctxext_provenance.json").read_text())["source"]
    assert source["repo_id"] == "org/tiny" and source["commit"] == MAIN


@pytest.mark.slow
def test_eval_and_finetune_fetch_only_safetensors(hub, cold_eval, tmp_path):
    assert cold_eval.code == 0, cold_eval.stderr
    assert _fetched(cold_eval.requests) == TOKENIZER | SHARDS
    run = json.loads((cold_eval.output / "results.json").read_text())["runs"][0]
    assert run["source"]["commit"] == MAIN

    cache2 = tmp_path / "hf-home-2"  # a fresh cache: finetune fetches on its own
    hub.clear()
    out = tmp_path / "ft"
    code, _, err, _ = ctxext(hub, cache2, "finetune", "org/tiny", "-m", "yarn", "--factor",
                             "2", "--steps", "1", "--warmup-steps", "0", "--save-every", "0",
                             "--train-length", "64", "-o", str(out))  # fmt: skip
    assert code == 0, err
    assert _fetched(hub.requests) == TOKENIZER | SHARDS
    source = json.loads((out / "ctxext_provenance.json").read_text())["source"]
    assert source["commit"] == MAIN


def test_revision_pin_reads_that_commit_and_records_it(hub, cache, tmp_path):
    hub.clear()
    code, out, err, _ = ctxext(hub, cache, "inspect", "org/tiny@v1", "--json")
    assert code == 0, err
    assert json.loads(out)["trained_length"] == 128  # v1's config, not main's
    assert json.loads(out)["revision"] == f"v1 @ {V1}"
    paths = {p for m, p in hub.requests if "/resolve/" in p}
    assert paths and all(f"/resolve/{V1}/" in p for p in paths)

    ext = tmp_path / "ext-v1"
    code, _, err, _ = ctxext(hub, cache, "extend", f"org/tiny@{V1}", "-m", "linear",
                             "--factor", "2", "-o", str(ext))  # fmt: skip
    assert code == 0, err
    source = json.loads((ext / "ctxext_provenance.json").read_text())["source"]
    assert source["commit"] == V1 and source["revision"] == V1


def test_offline_mode_uses_the_populated_cache(hub, cold_extend, tmp_path):
    cache, online = cold_extend.cache, cold_extend.output  # the cache an online run filled
    assert cold_extend.code == 0, cold_extend.stderr
    hub.clear()
    code, _, err, _ = ctxext(hub, cache, "inspect", "org/tiny", "--json", offline=True)
    assert code == 0, err
    code, _, err, _ = ctxext(hub, cache, "extend", "org/tiny", "-m", "yarn", "--factor", "2",
                             "-o", str(tmp_path / "offline"), offline=True)  # fmt: skip
    assert code == 0, err
    assert hub.requests == []  # not one request
    assert {p.name for p in (tmp_path / "offline").iterdir()} == {p.name for p in online.iterdir()}
    # Offline, a model that was never downloaded is one clear line.
    code, _, err, _ = ctxext(hub, cache, "inspect", "org/other", offline=True)
    assert code == 2 and "HF_HUB_OFFLINE" in err and len(err.splitlines()) == 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        ("org/gated", "is gated"),
        ("org/missing", "does not exist"),
        ("org/tiny@no-such-branch", "no revision 'no-such-branch'"),
        ("org/tiny", "cannot be reached"),
    ],
    ids=["gated-401", "missing-404", "missing-revision", "unreachable"],
)
def test_hub_errors_are_one_line_exit_2_and_fast(hub, cache, model, needle):
    endpoint = f"http://127.0.0.1:{_closed_port()}" if needle == "cannot be reached" else ""
    hub.clear()
    code, _, err, seconds = ctxext(hub, cache, "inspect", model, endpoint=endpoint)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert needle in err
    assert seconds < 5
    assert len(hub.requests) <= 2  # no retry storm


def test_pickled_weights_only_with_allow_pickle(hub, cache, tmp_path):
    hub.clear()
    code, _, err, _ = ctxext(hub, cache, "extend", "org/pickled", "-m", "yarn", "--factor", "2",
                             "-o", str(tmp_path / "refused"))  # fmt: skip
    assert code == 2 and "--allow-pickle" in err and len(err.splitlines()) == 1
    assert "pytorch_model.bin" not in _fetched(hub.requests)
    hub.clear()
    code, _, err, _ = ctxext(hub, cache, "extend", "org/pickled", "-m", "yarn", "--factor", "2",
                             "-o", str(tmp_path / "allowed"), "--allow-pickle")  # fmt: skip
    assert code == 0, err
    assert _fetched(hub.requests) == (TOKENIZER - CONFIG) | {
        "pytorch_model.bin"
    }  # config was cached


def test_weight_downloads_report_progress_once(hub, cache, cold_extend):
    """One bar per weight file, none for the small files, and none of huggingface_hub's own."""
    script = (
        "import json; from ctxext import locate\n"
        "events = []\n"
        "def bar(what, total):\n"
        "    events.append([what, total, 0])\n"
        "    return lambda done, e=events[-1]: e.__setitem__(2, done)\n"
        "locate.resolve_model('org/tiny', 'weights', progress=bar)\n"
        "print(json.dumps(events))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env |= {"HF_ENDPOINT": hub.url, "HF_HOME": str(cache), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    events = json.loads(proc.stdout)
    weights = sorted(f for f in SHARDS if f.endswith(".safetensors"))
    assert [e[0] for e in events] == [f"download {f}" for f in weights]
    assert all(total > 0 and done == total for _, total, done in events)
    # The CLI (an extend into an empty cache): our bars (tqdm, one per weight file) and not
    # huggingface_hub's aggregate bars.
    err = cold_extend.stderr
    assert cold_extend.code == 0, err
    assert all(f in err for f in weights) and "Fetching" not in err and "Download" not in err


@pytest.mark.slow
def test_eval_resolves_each_model_once_and_reads_one_commit(hub, cold_eval, tmp_path):
    """`eval org/tiny -m yarn -m linear -f 2 --lengths 64,128`: base + 2 methods x 2 lengths ask the
    Hub for the revision once, and for each file at most once (then pinned to that commit);
    a second run with the cache warm asks for the revision only."""
    hub.clear()
    code, out, err, _ = ctxext(hub, cold_eval.cache, *EVAL_TWO_METHODS, "-o", str(tmp_path / "w"))
    warm = Ran(code, out, err, list(hub.requests), cold_eval.cache, tmp_path / "w")
    for run, files in [(cold_eval, TOKENIZER | SHARDS), (warm, set())]:
        assert run.code == 0, run.stderr
        revisions = [p for _, p in run.requests if p.startswith("/api/models/org/tiny/revision/")]
        assert revisions == ["/api/models/org/tiny/revision/main"], run.requests
        per_file = Counter((m, p) for m, p in run.requests if "/resolve/" in p)
        assert all(n == 1 for n in per_file.values()), per_file
        assert {p.rsplit("/", 1)[1] for _, p in per_file} <= {f.rsplit("/", 1)[-1] for f in files}
        assert all(f"/resolve/{MAIN}/" in p for _, p in per_file)
        runs = json.loads((run.output / "results.json").read_text())["runs"]
        assert [r["source"]["commit"] for r in runs] == [MAIN] * 3


@pytest.mark.slow
def test_run_resolves_the_revision_once_and_every_phase_reads_that_commit(cache, tmp_path):
    """`ctxext run` on ``org/moving@main``, a branch pushed to as soon as it is resolved: the
    pre-run check, the fine-tune and the evaluations all read the first commit (the branch is
    asked for once), and provenance records it."""
    first, pushed = commit_sha("first"), commit_sha("pushed")
    files = _repo_files()
    repo = FakeRepo(commits={first: files, pushed: files}, refs={"main": first},
                    moves={"main": pushed})  # fmt: skip
    hub = FakeHub({"org/moving": repo}).start()
    recipe = tmp_path / "moving.yaml"
    recipe.write_text(
        "model: org/moving@main\n"
        "extend: {method: yarn, factor: 2}\n"
        "finetune: {steps: 1, warmup_steps: 0, save_every: 0, train_length: 64}\n"
        "eval: {compare: [base, extended, finetuned], lengths: [64], num_docs: 2}\n"
    )
    try:
        code, _, err, _ = ctxext(hub, cache, "run", str(recipe), "-o", str(tmp_path / "out"))
    finally:
        hub.stop()
    assert code == 0, err
    asked = [p for _, p in hub.requests if p == "/api/models/org/moving/revision/main"]
    assert asked == ["/api/models/org/moving/revision/main"], hub.requests
    assert repo.refs["main"] == pushed  # the branch did move while the run went on
    reads = [p for _, p in hub.requests if "/resolve/" in p or "/revision/" in p]
    assert all(first in p for p in reads if not p.endswith("/revision/main")), reads
    done = tmp_path / "out"
    results = json.loads((done / "results.json").read_text())
    base = results["provenance"]["models"]["base"]["source"]
    assert (base["revision"], base["commit"]) == ("main", first)
    hub_runs = [r for r in results["runs"] if r["source"].get("repo_id")]
    assert [r["variant"] for r in hub_runs] == ["base", "extended"]
    assert all(r["source"]["commit"] == first for r in hub_runs)
    tuned = json.loads((done / "model" / "ctxext_provenance.json").read_text())["source"]
    assert tuned["commit"] == first
