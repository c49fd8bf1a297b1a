"""ctxext.tune.search: the guard on a real model, the LongRoPE factor constraints."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import BUNDLED

from ctxext import rope
from ctxext.checkpoint import read_config
from ctxext.config import TuneConfig
from ctxext.tune.search import (
    Candidate,
    Scorer,
    Search,
    crossover,
    method_factors,
    mutate,
    repair,
)


@pytest.fixture(scope="module")
def bundled_search():
    """A Search on the bundled model (trained at 256) for target 512, on two documents."""
    from ctxext.data import load_documents, tokenize_documents
    from ctxext.modeling import load_causal_lm

    loaded = load_causal_lm(str(BUNDLED))
    docs = load_documents(None, split="heldout")
    ids = [t for t in tokenize_documents(loaded.tokenizer, docs) if len(t) >= 512][:2]
    config = read_config(BUNDLED)
    cfg = TuneConfig(target_length=512, search_docs=2, report_docs=1)
    scorer = Scorer(loaded.model, config, ids, loaded.tokenizer.bos_token_id, 512)
    return Search(scorer, cfg, rope.analyze(config), np.random.default_rng(0), lambda *a: None)


def test_the_guard_rejects_a_candidate_that_breaks_the_trained_length(bundled_search):
    pi16 = Candidate("linear", (("factor", 16.0),), "test")  # 16x interpolation at 256 tokens
    trial = bundled_search.score(pi16, [0, 1])
    assert trial.rejected and trial.ppl_trained > 1.05 * trial.guard_ref
    assert trial.ppl_target == math.inf  # never scored at the target, never chosen
    kept = bundled_search.score(Candidate("dynamic"), [0, 1])  # unchanged up to 256 tokens
    assert not kept.rejected and math.isfinite(kept.ppl_target)
    assert kept.ppl_trained == pytest.approx(kept.guard_ref, rel=1e-6)
    survivors = bundled_search.halving([pi16, Candidate("dynamic")], [2])
    assert [t.candidate.method for t in survivors] == ["dynamic"]


def test_longrope_factors_keep_their_constraints():
    """Searched factors stay in [1, 1.25 s] and non-decreasing (high to low frequency)."""
    s = 4.0
    raw = np.array([0.5, 2.0, 1.5, 3.0, 9.0, 4.0])  # below 1, a dip, above 1.25 s = 5
    np.testing.assert_array_equal(repair(raw, s), [1.0, 2.0, 2.0, 3.0, 5.0, 5.0])
    already = np.linspace(1.0, 5.0, 32)
    np.testing.assert_array_equal(repair(already, s), already)
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = mutate(already, s, rng, sigma=1.0)
        b = crossover(a, np.full(32, 3.0), s, rng)
        for f in (a, b):
            assert f.min() >= 1.0 and f.max() <= 1.25 * s and np.all(np.diff(f) >= 0)


def test_method_factors_write_pi_and_ntk_as_per_pair_divisors():
    """PI divides every pair by s; bloc97's NTK divides pair j by s^(2j/(d-2)) (typed here)."""
    config = {"model_type": "llama", "hidden_size": 256, "num_attention_heads": 4,
              "max_position_embeddings": 256, "rope_theta": 10000.0}  # fmt: skip
    info = rope.analyze(config)  # d = 64: 32 pairs; target 1024 -> s = 4
    linear = method_factors(Candidate("linear").spec(1024), info, 1024)
    np.testing.assert_allclose(linear, np.full(32, 4.0), rtol=1e-12)
    ntk = method_factors(Candidate("ntk").spec(1024), info, 1024)
    want = [4.0 ** (2 * j / 62) for j in range(32)]
    np.testing.assert_allclose(ntk, want, rtol=1e-12)
    tuned = Candidate("ntk", (("theta_multiplier", 8.0),)).spec(1024)
    np.testing.assert_allclose(
        method_factors(tuned, info, 1024), [8.0 ** (2 * j / 64) for j in range(32)], rtol=1e-12
    )
