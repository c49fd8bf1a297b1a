"""Untrusted checkpoints: code in a model folder runs only with --trust-remote-code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.fixture
def custom_code_model(tmp_path, tiny_llama) -> Path:
    """The tiny Llama, declared as a custom architecture whose code leaves a marker when run."""
    model = tmp_path / "custom"
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


def _eval(model: Path, tmp: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CTXEXT_TEST_MARKER": str(tmp / "marker"),
        "HF_MODULES_CACHE": str(tmp / "modules"),
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [sys.executable, "-m", "ctxext", "eval", str(model), "--lengths", "64", *flags]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_custom_code_is_refused_without_the_flag(custom_code_model, tmp_path):
    res = _eval(custom_code_model, tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "--trust-remote-code" in res.stderr
    assert not (tmp_path / "marker").exists(), "code from the model folder ran"


def test_the_flag_runs_it_and_says_so(custom_code_model, tmp_path):
    res = _eval(custom_code_model, tmp_path, "--trust-remote-code", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "warning: --trust-remote-code" in res.stderr
    assert (tmp_path / "marker").read_text() == "the folder's code ran"
    results = json.loads(res.stdout)
    assert results["runs"][0]["ppl"]["64"]["ppl"] > 1
