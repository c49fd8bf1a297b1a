"""ctxext.tune on one loaded model: every candidate's rope is swapped in place, so a row's score
must not depend on what ran before it, nor on which Scorer ran it.

The reference for every row is a fresh load of the bundled model (trained at 256) with that
row's rope, scored on the same document at 256 and 384 tokens.
"""

from __future__ import annotations

import pytest
from conftest import BUNDLED

from ctxext.checkpoint import read_config
from ctxext.tune.leaderboard import evaluate_rows
from ctxext.tune.search import Candidate, Scorer, _cand

TARGET, LENGTHS = 384, [256, 384]
ROWS: list[tuple[str, Candidate | None]] = [
    ("base (unscaled)", None),
    ("linear (paper default)", Candidate("linear")),
    ("dynamic (paper default)", Candidate("dynamic")),  # its frequencies follow the input length
    ("llama3 (paper default)", Candidate("llama3")),
    ("yarn (tuned)", _cand("yarn", "test", beta_fast=8.0, beta_slow=0.5, attention_factor=1.2)),
    ("longrope (tuned)", _cand("longrope", "test", long_factor=[1.0] * 8 + [1.6] * 24)),
]


@pytest.fixture(scope="module")
def bundled():
    """The bundled model, a held-out document of >= 384 tokens, and every row's reference
    perplexities from its own fresh load (None: the untouched checkpoint)."""
    from ctxext.data import load_documents, tokenize_documents
    from ctxext.evaluate.perplexity import evaluate_perplexity
    from ctxext.modeling import load_causal_lm

    loaded = load_causal_lm(str(BUNDLED), dtype="float32")
    docs = load_documents(None, split="heldout")
    ids = [t for t in tokenize_documents(loaded.tokenizer, docs) if len(t) >= TARGET][:1]
    bos = loaded.tokenizer.bos_token_id
    want = {}
    for label, cand in ROWS:
        spec = None if cand is None else cand.spec(TARGET)
        model = load_causal_lm(str(BUNDLED), extend=spec, dtype="float32").model
        want[label] = {n: evaluate_perplexity(model, ids, n, bos_token_id=bos).ppl for n in LENGTHS}
    return loaded.model, read_config(BUNDLED), ids, bos, want


def _check(runs: list[dict], want: dict[str, dict[int, float]]) -> None:
    got = {r["label"]: {n: r["ppl"][str(n)]["ppl"] for n in LENGTHS} for r in runs}
    for label, ppl in got.items():
        assert ppl == pytest.approx(want[label], rel=1e-5), label


def test_the_report_rows_equal_fresh_loads_after_a_search_on_the_same_model(bundled):
    """As `ctxext tune` runs: a search Scorer leaves the model with its last candidate's rope
    (here LongRoPE, as the search ends with LongRoPE's evolution); a second Scorer on other
    documents then measures the leaderboard, sharing the record of the model's rope (as
    tune/run.py wires them). The base row is the untouched model's score."""
    model, config, ids, bos, want = bundled
    search = Scorer(model, config, ids, bos, TARGET)
    for _, cand in ROWS[1:]:
        search.apply(cand)
    report = Scorer(model, config, ids, bos, TARGET, rope_now=search.rope_now)
    runs = evaluate_rows(report, ROWS, LENGTHS)
    _check(runs, want)


def test_a_rows_score_does_not_depend_on_the_order_of_evaluation(bundled):
    """In reverse order, with the base row after every other."""
    model, config, ids, bos, want = bundled
    rows = [r for row in ROWS[:0:-1] for r in (row, ROWS[0])]
    _check(evaluate_rows(Scorer(model, config, ids, bos, TARGET), rows, LENGTHS), want)
