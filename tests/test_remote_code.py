"""Untrusted checkpoints: code in a model folder runs only with --trust-remote-code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from subprocess import PIPE, CompletedProcess

import pytest
from conftest import finish_together

ROOT = Path(__file__).resolve().parents[1]

CONFIG_CODE = """
import os, pathlib
pathlib.Path(os.environ["CTXEXT_TEST_MARKER"]).write_text("the folder's code ran")
from transformers import LlamaConfig

class EvilConfig(LlamaConfig):
    model_type = "evil_llama"
"""

MODEL_CODE = """
from transformers import LlamaForCausalLM
from .configuration_evil import EvilConfig

class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
"""


def _custom_code_model(model: Path, tiny_llama: Path) -> Path:
    """The tiny Llama, declared as a custom architecture whose code leaves a marker when run."""
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "evil_llama"
    config["architectures"] = ["EvilForCausalLM"]
    config["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
    }
    (model / "config.json").write_text(json.dumps(config))
    (model / "configuration_evil.py").write_text(CONFIG_CODE)
    (model / "modeling_evil.py").write_text(MODEL_CODE)
    return model


def _eval(model: Path, tmp: Path, *flags: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CTXEXT_TEST_MARKER": str(tmp / "marker"),
        "HF_MODULES_CACHE": str(tmp / "modules"),
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [sys.executable, "-m", "ctxext", "eval", str(model), "--lengths", "64", *flags]
    return subprocess.Popen(cmd, env=env, stdout=PIPE, stderr=PIPE, text=True)


@pytest.fixture(scope="module")
def evals(tmp_path_factory, tiny_llama_session) -> dict[str, tuple[Path, CompletedProcess]]:
    """`ctxext eval` of the custom-code model without and with --trust-remote-code, each in
    its own folder (model copy, marker, modules cache) and process; the two processes run at
    the same time (most of each is imports)."""
    cases = {"refused": [], "trusted": ["--trust-remote-code", "--json"]}
    folders = {name: tmp_path_factory.mktemp(name) for name in cases}
    started = {
        name: _eval(_custom_code_model(tmp / "custom", tiny_llama_session), tmp, *cases[name])
        for name, tmp in folders.items()
    }
    done = finish_together(started, timeout=300)
    return {name: (folders[name], res) for name, res in done.items()}


def test_custom_code_is_refused_without_the_flag(evals):
    tmp_path, res = evals["refused"]
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "--trust-remote-code" in res.stderr
    assert not (tmp_path / "marker").exists(), "code from the model folder ran"


def test_the_flag_runs_it_and_says_so(evals):
    tmp_path, res = evals["trusted"]
    assert res.returncode == 0, res.stderr[-2000:]
    assert "warning: --trust-remote-code" in res.stderr
    assert (tmp_path / "marker").read_text() == "the folder's code ran"
    results = json.loads(res.stdout)
    assert results["runs"][0]["ppl"]["64"]["ppl"] > 1
