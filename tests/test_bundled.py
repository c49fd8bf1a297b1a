"""The bundled model behaves like a real RoPE checkpoint (issue 3's criteria, measured)."""

from __future__ import annotations

import json

import pytest
from conftest import BUNDLED

from ctxext import checkpoint, rope
from ctxext.config import ExtendConfig

pytestmark = pytest.mark.skipif(
    not (BUNDLED / "config.json").exists(), reason="bundled model not built"
)

NUM_DOCS = None  # every held-out file long enough: a 12-file sample swings by +-10%


def test_files_size_and_config():
    names = {p.name for p in BUNDLED.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert sum(p.stat().st_size for p in BUNDLED.iterdir()) <= 15 * 1024 * 1024
    config = json.loads((BUNDLED / "config.json").read_text())
    info = rope.analyze(config)
    assert config["model_type"] == "llama" and info.scheme == "rope"
    assert info.trained_length == 256 and config["vocab_size"] <= 8192
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA
    assert checkpoint.resolve_model(None).path == BUNDLED


@pytest.fixture(scope="module")
def heldout():
    from ctxext.data import load_documents, tokenize_documents
    from ctxext.modeling import load_tokenizer

    tok = load_tokenizer(BUNDLED)
    return tok, tokenize_documents(tok, load_documents(None, split="heldout"))


def _ppl(heldout, length, extend=None):
    from ctxext.evaluate import evaluate_perplexity
    from ctxext.modeling import load_causal_lm

    tok, ids = heldout
    model = load_causal_lm(None, extend=extend, dtype="float32").model
    return evaluate_perplexity(
        model, ids, length, bos_token_id=tok.bos_token_id, num_docs=NUM_DOCS, seed=0
    )


@pytest.fixture(scope="module")
def base_256(heldout):
    return _ppl(heldout, 256)


def test_trained_well(heldout, base_256):
    assert base_256.ppl <= 0.01 * len(heldout[0]), "not trained well enough"


def test_yarn_x4_recovers_the_trained_length_perplexity(heldout, base_256):
    yarn_1024 = _ppl(heldout, 1024, ExtendConfig(method="yarn", factor=4.0))
    assert yarn_1024.ppl <= base_256.ppl, "YaRN x4 should recover the trained-length perplexity"


def test_breaks_down_past_256_without_scaling(heldout, base_256):
    at_1024 = _ppl(heldout, 1024)
    assert at_1024.ppl >= 1.4 * base_256.ppl, "no breakdown past the trained length"
    buckets = [b["ppl"] for b in at_1024.buckets if b["n_tokens"]]
    assert buckets == sorted(buckets), f"perplexity should rise bucket by bucket: {buckets}"
