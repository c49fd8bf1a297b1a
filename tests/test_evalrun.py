"""`ctxext eval` end to end: variants side by side, protocol stated, output files, plots."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest
import torch
from conftest import run_cli, tree_hash
from transformers import AutoModelForCausalLM, AutoTokenizer

from ctxext.config import EvalConfig, ExtendConfig
from ctxext.evalrun import Variant, plan_variants


def test_plan_variants_base_plus_methods():
    cfg = EvalConfig(lengths=[128, 512])
    variants = plan_variants(["a", "b"], ["linear", "yarn"], {}, cfg)
    assert [(v.model, v.extend and v.extend.method) for v in variants] == [
        ("a", None), ("a", "linear"), ("a", "yarn"), ("b", None), ("b", "linear"), ("b", "yarn"),
    ]  # fmt: skip
    # without a factor, a method scales to the longest evaluated length
    assert variants[1].extend == ExtendConfig(method="linear", target_length=512)
    no_base = plan_variants(
        [None], ["ntk"], {"factor": 2.0}, cfg.model_copy(update={"include_base": False})
    )
    assert no_base == [Variant(None, ExtendConfig(method="ntk", factor=2.0))]


@pytest.fixture
def data_file(tmp_path):
    from ctxext.corpus import stdlib_documents

    docs = [d for d in stdlib_documents("heldout") if len(d.text) > 4000][:4]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in docs))
    return path


def test_eval_side_by_side_with_outputs(capsys, tmp_path, tiny_llama, data_file):
    before = tree_hash(tiny_llama)
    out = tmp_path / "res"
    code, stdout, err = run_cli(
        capsys, "eval", tiny_llama, "--lengths", "256,384,512", "--data", data_file,
        "-m", "linear", "-m", "yarn", "--task", "ppl", "--task", "passkey",
        "--passkey-trials", "1", "-o", out,
    )  # fmt: skip
    assert code == 0, err
    assert tree_hash(tiny_llama) == before
    results = json.loads((out / "results.json").read_text())
    labels = [r["label"] for r in results["runs"]]
    # trained at 128; without a factor a method scales to the longest length, 512 = 4 x 128
    # (a local model is labelled by the path as given)
    assert labels == [f"{tiny_llama}", f"{tiny_llama}+linear x4", f"{tiny_llama}+yarn x4"]
    assert [r["method"] for r in results["runs"]] == [None, "linear", "yarn"]
    assert results["protocol"]["ppl"]["name"] == "truncate"
    assert results["protocol"]["ppl"]["bos_prepended"] is True
    assert "passkey" in results["protocol"]
    assert len(results["data"]["fingerprint"]) >= 8 and results["versions"]["transformers"]
    for run in results["runs"]:
        assert set(run["ppl"]) == {"256", "384", "512"}
        for res in run["ppl"].values():
            assert res["ci_low"] <= res["ppl"] <= res["ci_high"]
            assert sum(b["n_tokens"] for b in res["buckets"]) == res["n_tokens"]
        assert len(run["config_sha256"]) == 64
        assert len(run["passkey"]["accuracy"]) == 3
    # scaled rows use a different config from the base row
    assert len({r["config_sha256"] for r in results["runs"]}) == 3
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert {r["task"] for r in rows} == {"ppl", "passkey"}
    for png in ("ppl_vs_length.png", "passkey_heatmap.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "perplexity" in stdout and "512" in stdout


def test_eval_numbers_match_plain_transformers(capsys, tmp_path, tiny_llama, data_file):
    """The base row equals a hand computation with vanilla transformers (truncate protocol)."""
    code, stdout, err = run_cli(
        capsys, "eval", tiny_llama, "--lengths", "128", "--data", data_file, "--json"
    )
    assert code == 0, err
    ppl = json.loads(stdout)["runs"][0]["ppl"]["128"]["ppl"]
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    nll, n = 0.0, 0
    for line in data_file.read_text().splitlines():
        ids = tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
        seq = torch.tensor([[tok.bos_token_id, *ids[:127]]])
        with torch.inference_mode():
            loss = model(seq, labels=seq).loss.item()
        nll, n = nll + loss * 127, n + 127
    assert ppl == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_fallback_encoding_reads_a_latin1_file_like_its_utf8_twin(capsys, tmp_path, tiny_llama):
    """The flag the non-UTF-8 error suggests works, and decodes the text exactly."""
    from ctxext.corpus import stdlib_documents

    text = next(d.text for d in stdlib_documents("heldout") if len(d.text) > 4000)
    text = text.replace("e", "\xe9")  # plenty of non-ASCII characters
    (tmp_path / "latin.txt").write_bytes(text.encode("latin-1"))
    (tmp_path / "utf8.txt").write_text(text, encoding="utf-8")
    ppl = {}
    for name, extra in (("latin.txt", ["--fallback-encoding", "latin-1"]), ("utf8.txt", [])):
        code, stdout, err = run_cli(
            capsys, "eval", tiny_llama, "--lengths", "128", "--data", tmp_path / name,
            "--json", *extra,
        )  # fmt: skip
        assert code == 0, err
        ppl[name] = json.loads(stdout)["runs"][0]["ppl"]["128"]["ppl"]
    assert ppl["latin.txt"] == ppl["utf8.txt"]
    code, _, err = run_cli(capsys, "eval", tiny_llama, "--lengths", "128", "--data",
                           tmp_path / "latin.txt", "--fallback-encoding", "no-such")  # fmt: skip
    assert code == 2 and "unknown text encoding 'no-such'" in err
