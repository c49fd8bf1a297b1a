"""One suite for bad input across commands.

Every case: exit code 2, exactly one line on stderr naming the problem (no traceback), the input
folder byte-for-byte unchanged, and no output (nor temporary sibling) left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import run_cli, subprocess_env, tree_hash


@dataclass
class Case:
    """``make(tmp, model) -> argv``; ``model`` is a private copy of the tiny checkpoint."""

    make: Callable[[Path, Path], list]
    expect: str  # a word the one-line message must contain (lower case)


def _model_with_config(tmp: Path, config: dict | str) -> Path:
    path = tmp / "model"
    path.mkdir(exist_ok=True)
    text = config if isinstance(config, str) else json.dumps(config)
    (path / "config.json").write_text(text)
    return path


def _extend(src: Path, tmp: Path, *args: str) -> list:
    return ["extend", src, "-o", tmp / "out", *args]


def _eval(model: Path, tmp: Path, *args: str) -> list:
    return ["eval", model, "-o", tmp / "out", *args]


def _datafile(tmp: Path, name: str, content: bytes) -> Path:
    path = tmp / "data" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    return path


def _a_file(tmp: Path) -> Path:
    path = tmp / "not-a-folder"
    path.write_text("x")
    return path


def _truncate_weights(model: Path) -> Path:
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return model


def _corrupt_weights(model: Path) -> Path:
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = b"\xff" * 8  # the header length: now absurd
    weights.write_bytes(bytes(data))
    return model


def _no_tokenizer(model: Path) -> Path:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    return model


def _pickle_only(model: Path) -> Path:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    return model


def _masked_lm(model: Path) -> Path:
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(model_type="bert", architectures=["BertForMaskedLM"])
    (model / "config.json").write_text(json.dumps(cfg))
    return model


LLAMA = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
         "max_position_embeddings": 128}  # fmt: skip


def _finetune(model: Path, tmp: Path, *args: str) -> list:
    return ["finetune", model, "-o", tmp / "out", "-m", "yarn", "-f", "2", "--steps", "2", *args]


def _existing_output(tmp: Path) -> Path:
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    return tmp / "out"


def _recipe(tmp: Path, text: str) -> list:
    path = tmp / "data" / "recipe.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return ["run", path]


RECIPE = """model: {model}
output_dir: {out}
extend: {{method: yarn, factor: 2.0}}
eval: {{lengths: [128]}}
"""


CASES: dict[str, Case] = {
    # --- what MODEL is
    "not a model folder": Case(
        lambda t, m: (
            _extend(t / "x", t, "-m", "yarn", "-f", "2") if (t / "x").mkdir() is None else []
        ),
        "config.json",
    ),
    "config not JSON": Case(
        lambda t, m: _extend(_model_with_config(t, "{oops"), t, "-m", "yarn", "-f", "2"),
        "not valid json",
    ),
    "config without model_type": Case(
        lambda t, m: _extend(_model_with_config(t, {"hidden_size": 8}), t, "-m", "yarn", "-f", "2"),
        "model_type",
    ),
    "learned positions (gpt2)": Case(
        lambda t, m: _extend(
            _model_with_config(t, {"model_type": "gpt2"}), t, "-m", "yarn", "-f", "2"
        ),
        "learned",
    ),
    "ALiBi (bloom)": Case(
        lambda t, m: _extend(
            _model_with_config(t, {"model_type": "bloom"}), t, "-m", "yarn", "-f", "2"
        ),
        "alibi",
    ),
    "ALiBi (falcon alibi=true)": Case(
        lambda t, m: _extend(
            _model_with_config(t, {"model_type": "falcon", "alibi": True}),
            t,
            "-m",
            "yarn",
            "-f",
            "2",
        ),
        "alibi",
    ),
    "already scaled": Case(
        lambda t, m: _extend(
            _model_with_config(
                t,
                {
                    **LLAMA,
                    "rope_scaling": {
                        "type": "yarn",
                        "factor": 4.0,
                        "original_max_position_embeddings": 32,
                    },
                },
            ),
            t,
            "-m",
            "yarn",
            "-f",
            "2",
        ),
        "already",
    ),
    "architecture refuses method (phi3)": Case(
        lambda t, m: _extend(
            _model_with_config(t, {**LLAMA, "model_type": "phi3"}), t, "-m", "dynamic", "-f", "2"
        ),
        "longrope",
    ),
    "missing model folder": Case(
        lambda t, m: _extend(t / "nope", t, "-m", "yarn", "-f", "2"), "does not exist"
    ),
    # --- scaling arguments
    "unknown method": Case(lambda t, m: _extend(m, t, "-m", "xpos", "-f", "2"), "method"),
    "factor 0": Case(lambda t, m: _extend(m, t, "-m", "yarn", "-f", "0"), "factor"),
    "factor 1": Case(lambda t, m: _extend(m, t, "-m", "yarn", "-f", "1"), "factor"),
    "factor negative": Case(lambda t, m: _extend(m, t, "-m", "linear", "-f", "-4"), "factor"),
    "factor NaN": Case(lambda t, m: _extend(m, t, "-m", "ntk", "-f", "nan"), "factor"),
    "factor a string": Case(lambda t, m: _extend(m, t, "-m", "yarn", "-f", "four"), "factor"),
    "target below trained length": Case(
        lambda t, m: _extend(m, t, "-m", "yarn", "-t", "64"), "trained"
    ),
    # --- outputs
    "output exists": Case(
        lambda t, m: _extend(m, t, "-m", "yarn", "-f", "2") if (t / "out").mkdir() is None else [],
        "already exists",
    ),
    "output is a file": Case(
        lambda t, m: _extend(m, t, "-m", "yarn", "-f", "2") if (t / "out").write_text("x") else [],
        "is a file",
    ),
    "output inside input": Case(
        lambda t, m: ["extend", m, "-o", m / "ext", "-m", "yarn", "-f", "2"], "inside the input"
    ),
    "output under a file": Case(
        lambda t, m: ["extend", m, "-o", _a_file(t) / "b", "-m", "yarn", "-f", "2"], "is a file"
    ),
    # --- weights and tokenizer (commands that load them)
    "truncated safetensors": Case(
        lambda t, m: _eval(_truncate_weights(m), t, "--lengths", "64"), "corrupt"
    ),
    "corrupted safetensors header": Case(
        lambda t, m: _eval(_corrupt_weights(m), t, "--lengths", "64"), "corrupt"
    ),
    "missing tokenizer": Case(
        lambda t, m: _eval(_no_tokenizer(m), t, "--lengths", "64"), "tokenizer"
    ),
    "pickled weights without --allow-pickle": Case(
        lambda t, m: _eval(_pickle_only(m), t, "--lengths", "64"), "allow-pickle"
    ),
    "not a causal LM": Case(lambda t, m: _eval(_masked_lm(m), t, "--lengths", "64"), "causal"),
    # --- data
    "empty data file": Case(
        lambda t, m: _eval(m, t, "--data", _datafile(t, "e.txt", b"")), "no text"
    ),
    "binary data file": Case(
        lambda t, m: _eval(m, t, "--data", _datafile(t, "b.txt", bytes(range(256)) * 4)), "binary"
    ),
    "non-UTF-8 data file": Case(
        lambda t, m: _eval(
            m, t, "--data", _datafile(t, "l.txt", "caf\xe9 ".encode("latin-1") * 50)
        ),
        "utf-8",
    ),
    "no document long enough": Case(
        lambda t, m: _eval(m, t, "--data", _datafile(t, "s.txt", b"short text"), "--lengths", "64"),
        "longest",
    ),
    "missing data path": Case(lambda t, m: _eval(m, t, "--data", t / "none.txt"), "does not exist"),
    "lengths zero": Case(lambda t, m: _eval(m, t, "--lengths", "0"), "positive"),
    "lengths negative": Case(lambda t, m: _eval(m, t, "--lengths", "128,-5"), "positive"),
    "lengths not numbers": Case(lambda t, m: _eval(m, t, "--lengths", "lots"), "positive"),
    "depth above 1": Case(
        lambda t, m: _eval(m, t, "--passkey-depths", "0,1.5"), "--passkey-depths must be fractions"
    ),
    "depth not a number": Case(lambda t, m: _eval(m, t, "--passkey-depths", "mid"), "'mid'"),
    "reference model missing": Case(
        lambda t, m: _eval(m, t, "--reference-model", t / "nope"), "does not exist"
    ),
    # --- finetune
    "finetune steps zero": Case(lambda t, m: _finetune(m, t, "--steps", "0"), "steps"),
    "finetune lora rank zero": Case(lambda t, m: _finetune(m, t, "--lora-rank", "0"), "lora"),
    "finetune train length above target": Case(
        lambda t, m: _finetune(m, t, "--pose", "--train-length", "512"), "train length"
    ),
    "finetune too little data": Case(
        lambda t, m: _finetune(m, t, "--data", _datafile(t, "tiny.txt", b"x = 1\n" * 20)),
        "tokens",
    ),
    "finetune output exists": Case(
        lambda t, m: [*_finetune(m, t)[:3], _existing_output(t), *_finetune(m, t)[4:]], "exists"
    ),
    "finetune resume without checkpoint": Case(lambda t, m: _finetune(m, t, "--resume"), "resume"),
    "finetune unknown mix source": Case(
        lambda t, m: _finetune(m, t, "--mix", "stdlib:1", "--mix", "retreival:1"),
        "unknown mix source",
    ),
    "finetune negative mix weight": Case(
        lambda t, m: _finetune(m, t, "--mix", "stdlib:1", "--mix", "multikey:-0.5"), ">= 0"
    ),
    "finetune mix weights sum to zero": Case(
        lambda t, m: _finetune(m, t, "--mix", "stdlib:0", "--mix", "multikey:0"), "sum to 0"
    ),
    "finetune mix item without weight": Case(
        lambda t, m: _finetune(m, t, "--mix", "stdlib"), "source:weight"
    ),
    "finetune task longer than the training length": Case(
        lambda t, m: _finetune(
            m, t, "--mix", "stdlib:1", "--mix", "multihop:1", "--task-hops", "40"
        ),
        "does not fit the training length 256",
    ),
    "finetune longce window not below the training length": Case(
        lambda t, m: _finetune(m, t, "--loss", "longce", "--longce-window", "256"),
        "not shorter than the training length 256",
    ),
    # --- recipes
    "recipe unknown key": Case(
        lambda t, m: _recipe(t, RECIPE.format(model=m, out=t / "out") + "learning_rate: 1\n"),
        "learning_rate",
    ),
    "recipe wrong type": Case(
        lambda t, m: _recipe(t, RECIPE.format(model=m, out=t / "out").replace("2.0", "big")),
        "factor",
    ),
    "recipe invalid yaml": Case(lambda t, m: _recipe(t, "model: [unclosed\n"), "yaml"),
    "recipe writes outside its folder": Case(
        lambda t, m: _recipe(
            t, RECIPE.format(model=m, out=t / "out") + "outputs: {checkpoint: ../elsewhere}\n"
        ),
        "inside output_dir",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(capsys, tmp_path, tiny_llama, name):
    case = CASES[name]
    argv = case.make(tmp_path, tiny_llama)
    watched = [p for p in (tiny_llama, tmp_path / "model", tmp_path / "data") if p.exists()]
    before = {p: tree_hash(p) for p in watched}
    listing = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and case.expect in lines[0].lower(), lines[0]
    assert "Traceback" not in err
    assert {p: tree_hash(p) for p in watched} == before, "an input was modified"
    assert sorted(p.name for p in tmp_path.iterdir()) == listing, "partial output left behind"


def test_unknown_hub_id_offline(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "ctxext", "inspect", "nobody/no-such-model"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "cache" in res.stderr
    assert "Traceback" not in res.stderr


def test_dataset_not_loadable_offline(tmp_path, tiny_llama):
    # A fresh process, as a user sets offline mode: huggingface_hub and datasets read these
    # variables when they are imported, so setting them inside a process that has already
    # imported datasets (another test did) would leave it online, trying the network.
    env = {**subprocess_env(), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    args = [str(a) for a in _eval(tiny_llama, tmp_path, "--data", "nobody/no-dataset")]
    res = subprocess.run([sys.executable, "-m", "ctxext", *args], env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    err = res.stderr
    assert res.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert "offline" in err.lower() and "Traceback" not in err, err


def test_output_not_writable(capsys, tmp_path, tiny_llama):
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=16k", "tmpfs", str(locked)])
        if res.returncode != 0:
            pytest.skip("root without mount rights: cannot make a folder unwritable")
    else:
        locked.chmod(0o555)
    try:
        code, _, err = run_cli(capsys, *_extend(tiny_llama, locked, "-m", "yarn", "-f", "2"))
        assert code == 2 and "writ" in err and len(err.strip().splitlines()) == 1, err
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(locked)], check=False)
        shutil.rmtree(locked, ignore_errors=True)


# Cases decided from flags, file names and small JSON/YAML files alone.
CHEAP = [
    name
    for name in CASES
    if not name.startswith(("truncated", "corrupted", "missing tokenizer", "pickled", "not a"))
    and name not in ("binary data file", "non-UTF-8 data file", "empty data file")
    and name not in ("no document long enough", "missing data path", "finetune too little data")
    and name != "finetune output exists"
]


def test_cheap_checks_come_before_torch(tmp_path, tiny_llama):
    """Check everything cheap before anything slow: these refusals never import torch.

    All cases run in one fresh interpreter, in order; each reports whether torch (or
    transformers) was imported by the time it was refused.
    """
    argvs = {}
    for i, name in enumerate(CHEAP):
        folder = tmp_path / str(i)
        folder.mkdir()
        model = folder / "tiny-llama"
        shutil.copytree(tiny_llama, model)
        argvs[name] = [str(a) for a in CASES[name].make(folder, model)]
    script = (
        "import json, sys\n"
        "from ctxext.cli.app import main\n"
        "report = {}\n"
        "for name, argv in json.loads(sys.argv[1]).items():\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "        report[name] = [e.code, heavy]\n"
        "print(json.dumps(report))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", script, json.dumps(argvs)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(CHEAP) >= 25 and list(report) == CHEAP
    assert {name: r for name, r in report.items() if r != [2, []]} == {}
