"""`ctxext inspect` (ctxext/cli/inspect.py): JSON and table output for rope and non-rope models."""

from __future__ import annotations

import json

from conftest import run_cli


def test_inspect_rope_model(capsys, tiny_llama):
    code, out, _ = run_cli(capsys, "inspect", tiny_llama, "--target-length", "512", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["scheme"] == "rope" and report["trained_length"] == 128
    assert len(report["pairs"]) == 8  # head_dim 16 -> 8 pairs
    code, out, _ = run_cli(capsys, "inspect", tiny_llama)
    assert code == 0 and "wavelength" in out.lower()


def test_inspect_non_rope_model(capsys, tmp_path):
    src = tmp_path / "gpt2"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 1024}))
    code, out, _ = run_cli(capsys, "inspect", src, "--json")
    assert code == 0 and json.loads(out)["scheme"] == "learned"
