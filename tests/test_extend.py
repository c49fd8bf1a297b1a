"""`ctxext extend` end to end on real tiny checkpoints, through the real CLI entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tree_hash
from transformers import AutoModelForCausalLM

from ctxext.checkpoint import PROVENANCE_FILE


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.mark.parametrize(
    ("method", "expected_max"),
    [("linear", 128), ("dynamic", 128), ("yarn", 512), ("ntk", 512), ("llama3", 512)],
)
def test_extend_writes_one_config_every_engine_reads(
    capsys, tmp_path, tiny_llama, method, expected_max
):
    before = tree_hash(tiny_llama)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "extend", tiny_llama, "-o", out, "--method", method, "-f", "4")
    assert code == 0, err
    cfg = _config(out)
    params, legacy = cfg["rope_parameters"], cfg.get("rope_scaling")
    assert cfg["max_position_embeddings"] == expected_max
    assert isinstance(cfg["rope_theta"], float)
    assert cfg["original_max_position_embeddings"] == 128
    if method == "ntk":
        # static NTK is a new base: rope_type default everywhere, no legacy scaling block
        # (TGI and older vLLM reject rope_scaling {"type": "default"})
        assert legacy is None and params["rope_type"] == "default"
        assert cfg["rope_theta"] == params["rope_theta"] > 10000.0
    else:
        assert legacy["rope_type"] == legacy["type"] == params["rope_type"] == method
        assert isinstance(params["factor"], float) and params["factor"] == 4.0
        assert legacy["factor"] == params["factor"]
    tok = json.loads((out / "tokenizer_config.json").read_text())
    assert tok["model_max_length"] == 512
    assert tree_hash(tiny_llama) == before, "the input folder must never change"


def test_weights_are_hardlinked_not_rewritten(capsys, tmp_path, tiny_llama):
    out = tmp_path / "out"
    code, _, _ = run_cli(capsys, "extend", tiny_llama, "-o", out, "-m", "yarn", "-f", "2")
    assert code == 0
    src, dst = tiny_llama / "model.safetensors", out / "model.safetensors"
    assert os.stat(src).st_ino == os.stat(dst).st_ino
    prov = json.loads((out / PROVENANCE_FILE).read_text())
    assert prov["method"] == "yarn" and prov["factor"] == 2.0
    assert prov["config_sha256_before"] != prov["config_sha256_after"]
    assert prov["files"]["model.safetensors"] == "hardlink"
    assert "transformers" in prov["versions"]


@pytest.mark.parametrize(("flag", "check"), [("--copy", "copy"), ("--symlink", "symlink")])
def test_copy_and_symlink_modes(capsys, tmp_path, tiny_llama, flag, check):
    out = tmp_path / "out"
    code, _, _ = run_cli(capsys, "extend", tiny_llama, "-o", out, "-m", "linear", "-f", "2", flag)
    assert code == 0
    dst = out / "model.safetensors"
    if check == "symlink":
        assert dst.is_symlink()
    else:
        assert not dst.is_symlink()
        assert os.stat(dst).st_ino != os.stat(tiny_llama / "model.safetensors").st_ino
    assert dst.read_bytes() == (tiny_llama / "model.safetensors").read_bytes()


def test_output_loads_and_matches_in_memory_extension(capsys, tmp_path, tiny_llama):
    """The written checkpoint computes exactly what the in-memory rewrite computes."""
    from ctxext.config import ExtendConfig
    from ctxext.modeling import load_causal_lm

    out = tmp_path / "out"
    assert run_cli(capsys, "extend", tiny_llama, "-o", out, "-m", "yarn", "-t", "512")[0] == 0
    on_disk = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    spec = ExtendConfig(method="yarn", target_length=512)
    in_memory = load_causal_lm(str(tiny_llama), extend=spec, dtype="float32").model
    ids = torch.randint(0, 300, (1, 300))
    with torch.inference_mode():
        a = on_disk(ids).logits
        b = in_memory(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dry_run_writes_nothing(capsys, tmp_path, tiny_llama):
    out = tmp_path / "out"
    code, stdout, _ = run_cli(
        capsys, "extend", tiny_llama, "-o", out, "-m", "yarn", "-f", "4", "--dry-run"
    )
    assert code == 0
    assert "rope_parameters" in stdout and "max_position_embeddings" in stdout
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-llama"]


def test_missing_parents_created_with_usual_permissions(capsys, tmp_path, tiny_llama):
    out = tmp_path / "runs" / "deep" / "out"
    code, _, err = run_cli(capsys, "extend", tiny_llama, "-o", out, "-m", "yarn", "-f", "2")
    assert code == 0, err
    assert (out / "config.json").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700


def test_existing_output_refused_then_overwritten(capsys, tmp_path, tiny_llama):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "extend", tiny_llama, "-o", out, "-m", "yarn", "-f", "4")
    assert code == 2 and "--overwrite" in err and err.count("\n") == 1
    assert (out / "keep.txt").read_text() == "mine"
    code, _, _ = run_cli(
        capsys, "extend", tiny_llama, "-o", out, "-m", "yarn", "-f", "4", "--overwrite"
    )
    assert code == 0 and not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp folders left"


def _hf_cache_with(model_dir: Path, cache: Path, repo: str) -> None:
    """Lay out a real huggingface_hub cache entry by hand: blobs, snapshot links, refs."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    (root / "blobs").mkdir()
    for f in model_dir.iterdir():
        blob = root / "blobs" / f"blob-{f.name}"
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)


def test_hub_id_from_offline_cache(tmp_path, tiny_llama):
    cache = tmp_path / "hub"
    _hf_cache_with(tiny_llama, cache, "acme/tiny-llama")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ctxext", "extend", "acme/tiny-llama", "-o", str(out)]
    res = subprocess.run([*cmd, "-m", "yarn", "-f", "4"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert _config(out)["rope_parameters"]["rope_type"] == "yarn"
    # the weight file in OUT is the real blob's bytes, not a dangling link into the cache
    assert not (out / "model.safetensors").is_symlink()
    missing = subprocess.run(
        [*cmd[:4], "acme/absent", "-o", str(tmp_path / "o2"), "-m", "yarn", "-f", "4"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2
    assert "not in the local Hugging Face cache" in missing.stderr
    assert "Traceback" not in missing.stderr and missing.stderr.count("\n") == 1
