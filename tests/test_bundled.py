"""The bundled model behaves like a real RoPE checkpoint (issue 3's criteria, measured on the
same documents at every length: issue 14)."""

from __future__ import annotations

import json

import pytest
from conftest import BUNDLED

from ctxext import locate, rope
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
    assert locate.resolve_model(None).path == BUNDLED


@pytest.fixture(scope="module")
def heldout():
    from ctxext.data import load_documents, tokenize_documents
    from ctxext.modeling import load_tokenizer

    tok = load_tokenizer(BUNDLED)
    return tok, tokenize_documents(tok, load_documents(None, split="heldout"))


#: Every criterion compares 256 with 1024 tokens on the same documents: the held-out files of at
#: least 1024 tokens, scored on their first 256 and first 1024 tokens (YaRN protocol).
LENGTHS = [256, 1024]


def _sweep(heldout, extend=None):
    from ctxext.evaluate.perplexity import evaluate_lengths
    from ctxext.modeling import load_causal_lm

    tok, ids = heldout
    model = load_causal_lm(None, extend=extend, dtype="float32").model
    return evaluate_lengths(
        model, ids, LENGTHS, bos_token_id=tok.bos_token_id, num_docs=NUM_DOCS, seed=0
    )


@pytest.fixture(scope="module")
def base(heldout):
    results = _sweep(heldout)
    assert results[256].doc_fingerprint == results[1024].doc_fingerprint  # same documents
    return results


def test_trained_well(heldout, base):
    assert base[256].ppl <= 0.01 * len(heldout[0]), "not trained well enough"


def test_yarn_x4_recovers_the_trained_length_perplexity(heldout, base):
    yarn = _sweep(heldout, ExtendConfig(method="yarn", factor=4.0))
    assert yarn[1024].doc_fingerprint == base[256].doc_fingerprint
    assert yarn[1024].ppl <= base[256].ppl, "YaRN x4 should recover the trained-length perplexity"


def test_breaks_down_past_256_without_scaling(base):
    assert base[1024].ppl >= 1.4 * base[256].ppl, "no breakdown past the trained length"
    buckets = [b["ppl"] for b in base[1024].buckets if b["n_tokens"]]
    assert buckets == sorted(buckets), f"perplexity should rise bucket by bucket: {buckets}"


def test_retrieves_in_trained_and_in_held_out_syntax_at_its_trained_length(heldout):
    """At 256 tokens the model retrieves >= 90% over the depths in code forms of the training
    split (`attr-if-camel`, `plain-return-snake`; 8 keys per depth; measured 100% at depths
    0-0.75 and 62% / 88% at depth 1, the key on the line just before the question, where the
    3000-step model retrieved at least 90%), never below 50% at any depth, and at least 50% in
    each held-out family (issue 29: new syntax, no line shared with training; measured 78% / 65% /
    75% here with 60 keys per family, 74% / 63% / 77% with 90 in docs/bundled-model.md), where
    the model trained without the composed forms retrieved 1-18%. Pinned so that a retrain that
    changes either is noticed."""
    from ctxext.evaluate.needles import HELDOUT_FAMILIES, families_of
    from ctxext.evaluate.retrieval import evaluate_retrieval
    from ctxext.modeling import load_causal_lm

    tok, ids = heldout
    model = load_causal_lm(None, dtype="float32").model
    seen = "attr-if-camel,plain-return-snake"
    res = evaluate_retrieval(model, tok, [256], template=seen, doc_token_ids=ids, trials=8)
    for name in seen.split(","):
        by_depth = res.by_template[name][0]
        assert sum(by_depth) / len(by_depth) >= 0.9, (name, res.by_template)
        assert min(by_depth) >= 0.5, (name, res.by_template)
    held = evaluate_retrieval(model, tok, [256], template="heldout", doc_token_ids=ids, trials=4)
    families = families_of(held.templates)
    assert tuple(families) == HELDOUT_FAMILIES
    for family, names in families.items():
        acc = sum(sum(held.by_template[n][0]) / 5 for n in names) / len(names)
        assert acc >= 0.5, (family, held.by_template)
