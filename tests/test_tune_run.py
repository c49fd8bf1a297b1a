"""ctxext.tune.run (`ctxext tune`): a real search on a real (tiny) model, replayed, reloaded
and fine-tuned.

The tiny Llama of conftest (trained length 128) is tuned for 256 tokens with a small budget
(the guard is checked on the bundled model in test_tune_search.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import BUNDLED, run_cli

from ctxext import rope
from ctxext.checkpoint import read_config
from ctxext.cli.app import main

TARGET = 256
ARGS = ["--target-length", str(TARGET), "--methods", "yarn,ntk,linear,longrope",
        "--budget-evals", "30", "--search-docs", "3", "--report-docs", "2", "--seed", "3"]  # fmt: skip
VOLATILE = ("created", "timing", "versions")


def _tune(capsys, model: Path, out: Path, *extra: str) -> dict:
    code, stdout, err = run_cli(capsys, "tune", model, "-o", out, *ARGS, *extra, "--json")
    assert code == 0, err
    printed = json.loads(stdout)
    written = json.loads((out / "tune.json").read_text())
    assert printed == written
    return written


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_llama_session) -> tuple[Path, dict]:
    """One search (module-scoped fixtures cannot use capsys: stdout is redirected instead)."""
    out = tmp_path_factory.mktemp("tune") / "out"
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as exc:
        main(["tune", str(tiny_llama_session), "-o", str(out), *ARGS, "--json"])
    assert exc.value.code == 0
    return out, json.loads((out / "tune.json").read_text())


def test_tune_writes_checkpoint_recipe_leaderboard_and_every_candidate(tuned, tiny_llama_session):
    out, result = tuned
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tune.json", "recipe.yaml"} <= names
    assert {"leaderboard.md", "leaderboard.png", "ctxext_provenance.json"} <= names
    # Disjoint, recorded document sets.
    search, report = result["data"]["search_documents"], result["data"]["report_documents"]
    assert len(search) == 3 and len(report) == 2 and not set(search) & set(report)
    # Every method was tried, its paper default included, and every trial has its scores.
    tried = {c["method"] for c in result["candidates"]}
    assert tried == {"yarn", "ntk", "linear", "longrope"}
    assert all(any(c["method"] == m and not c["params"] for c in result["candidates"])
               for m in ("yarn", "ntk", "linear"))  # fmt: skip
    for c in result["candidates"]:
        assert math.isfinite(c["ppl_at_trained"]) and c["search_docs_scored"] >= 1
        assert c["rejected_by_guard"] == (c["trained_cost"] > 0.05)
        assert c["rejected_by_guard"] or math.isfinite(c["ppl_at_target"])
    # LongRoPE candidates respect the constraints: d/2 factors in [1, 1.25 s], non-decreasing.
    pairs = rope.analyze(read_config(tiny_llama_session)).rotary_dim // 2
    for c in result["candidates"]:
        if c["method"] == "longrope":
            lam = np.array(c["params"]["long_factor"])
            assert lam.shape == (pairs,) and lam.min() >= 1.0 and lam.max() <= 1.25 * 2 + 1e-9
            assert np.all(np.diff(lam) >= 0)
    # The chosen one is the best search score among the guard-passing bests.
    best = result["best_per_method"]
    assert result["chosen"]["method"] == min(best, key=lambda m: best[m]["ppl_at_target"])
    labels = [r["label"] for r in result["leaderboard"]]
    assert "base (unscaled)" in labels and "yarn (paper default)" in labels
    assert f"{result['chosen']['method']} (tuned)" in labels
    ppl = [r["ppl_target"] for r in result["leaderboard"]]
    assert ppl == sorted(ppl)


def test_written_config_is_the_chosen_candidate(tuned, tiny_llama_session):
    out, result = tuned
    spec = result["chosen"]["extend"]
    opts = {k: v for k, v in spec.items() if k not in ("method", "factor", "target_length")}
    want = rope.extend_config(
        read_config(tiny_llama_session), spec["method"], spec["factor"], spec["target_length"],
        **opts,
    )  # fmt: skip
    assert read_config(out) == want


def test_the_written_checkpoint_reproduces_the_reported_score(tuned):
    """Loading OUT from disk scores exactly what the leaderboard reports for the tuned row."""
    from ctxext.data import load_documents, tokenize_documents
    from ctxext.evaluate.perplexity import evaluate_perplexity
    from ctxext.modeling import load_causal_lm

    out, result = tuned
    loaded = load_causal_lm(str(out))
    names = result["data"]["report_documents"]
    docs = {d.name: d for d in load_documents(None, split="heldout")}
    ids = tokenize_documents(loaded.tokenizer, [docs[n] for n in names])
    row = next(r for r in result["report"]["runs"] if r["label"].endswith("(tuned)")
               and r["method"] == result["chosen"]["method"])  # fmt: skip
    for length in result["report"]["lengths"]:
        got = evaluate_perplexity(
            loaded.model, ids, length, bos_token_id=loaded.tokenizer.bos_token_id
        )
        assert got.ppl == pytest.approx(row["ppl"][str(length)]["ppl"], rel=1e-6)


def test_the_base_and_paper_rows_are_what_a_fresh_load_scores(tuned, tiny_llama_session):
    """The leaderboard runs on the model the search left with its last candidate's rope (a
    LongRoPE one): the base row is still the untouched checkpoint's score, and each paper
    default row that of the checkpoint loaded with that method."""
    from ctxext.config import ExtendConfig
    from ctxext.data import load_documents, tokenize_documents
    from ctxext.evaluate.perplexity import evaluate_perplexity
    from ctxext.modeling import load_causal_lm

    _, result = tuned
    docs = {d.name: d for d in load_documents(None, split="heldout")}
    names = result["data"]["report_documents"]
    for row in result["report"]["runs"]:
        if row["label"].endswith("(tuned)"):
            continue
        spec = row["extend"] and ExtendConfig.model_validate(row["extend"])
        loaded = load_causal_lm(str(tiny_llama_session), extend=spec)
        ids = tokenize_documents(loaded.tokenizer, [docs[n] for n in names])
        for length in result["report"]["lengths"]:
            got = evaluate_perplexity(
                loaded.model, ids, length, bos_token_id=loaded.tokenizer.bos_token_id
            )
            assert got.ppl == pytest.approx(row["ppl"][str(length)]["ppl"], rel=1e-6), (
                row["label"],
                length,
            )


def test_search_is_deterministic_for_a_seed(tuned, tiny_llama_session, tmp_path, capsys):
    _, first = tuned
    again = _tune(capsys, tiny_llama_session, tmp_path / "again")
    strip = lambda r: {k: v for k, v in r.items() if k not in VOLATILE}  # noqa: E731
    assert strip(again) == strip(first)
    # Another seed draws another split (checked without a second search: it is the first step).
    from ctxext.config import TuneConfig
    from ctxext.tune.run import split_documents

    ids = [[0] * 300] * 12
    splits = {
        seed: split_documents(ids, TuneConfig(target_length=256, search_docs=3, report_docs=2,
                                              seed=seed), None)
        for seed in (3, 4)
    }  # fmt: skip
    assert splits[3] != splits[4]


def test_recipe_snippet_reproduces_the_checkpoint(tuned, tmp_path, capsys, monkeypatch):
    out, _ = tuned
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "run", out / "recipe.yaml", "--output-dir", "again")
    assert code == 0, err
    assert read_config(tmp_path / "again" / "model") == read_config(out)


def test_a_recipe_can_extend_with_longrope(tiny_llama_session, tmp_path, capsys, monkeypatch):
    pairs = rope.analyze(read_config(tiny_llama_session)).rotary_dim // 2
    factors = np.linspace(1.0, 2.0, pairs).round(3).tolist()
    recipe = {
        "model": str(tiny_llama_session),
        "extend": {"method": "longrope", "factor": 2.0, "long_factor": factors},
    }
    path = tmp_path / "lr.yaml"
    path.write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "run", path, "--output-dir", "lr")
    assert code == 0, err
    params = read_config(tmp_path / "lr" / "model")["rope_parameters"]
    assert params["rope_type"] == "longrope" and params["long_factor"] == factors
    assert params["short_factor"] == [1.0] * pairs


def test_finetune_runs_on_the_tuned_output(tuned, tmp_path, capsys):
    out, _ = tuned
    code, _, err = run_cli(
        capsys, "finetune", out, "-o", tmp_path / "ft", "--steps", "1", "--warmup-steps", "0",
        "--save-every", "0",
    )  # fmt: skip
    assert code == 0, err
    rope_type = read_config(tmp_path / "ft")["rope_parameters"]["rope_type"]
    assert rope_type == read_config(out)["rope_parameters"]["rope_type"]


def test_finetune_runs_on_a_longrope_checkpoint(tiny_llama_session, tmp_path, capsys):
    pairs = rope.analyze(read_config(tiny_llama_session)).rotary_dim // 2
    (tmp_path / "lf.json").write_text(json.dumps(np.linspace(1.0, 2.0, pairs).tolist()))
    ext = tmp_path / "ext"
    code, _, err = run_cli(
        capsys, "extend", tiny_llama_session, "-o", ext, "-m", "longrope", "-f", "2",
        "--long-factor", tmp_path / "lf.json",
    )  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(
        capsys, "finetune", ext, "-o", tmp_path / "ft", "--steps", "1", "--warmup-steps", "0",
        "--save-every", "0",
    )  # fmt: skip
    assert code == 0, err
    assert (
        read_config(tmp_path / "ft")["rope_parameters"]["long_factor"]
        == read_config(ext)["rope_parameters"]["long_factor"]
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-m", "longrope"], "--method longrope needs --long-factor"),
        (["-m", "longrope", "--long-factor", "FILE2"], "has 2 numbers but this model has 32"),
        (["-m", "longrope", "--long-factor", "MISSING"], "--long-factor"),
        (["-m", "longrope", "--long-factor", "BAD"], "expected a JSON list of numbers"),
        (
            ["-m", "yarn", "--long-factor", "FILE2"],
            "--long-factor applies only to --method longrope",
        ),
    ],
)
def test_bad_longrope_input_exits_2_with_one_line(capsys, tmp_path, args, message):
    files = {"FILE2": "[1.0, 2.0]", "BAD": "one, two"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    args = [str(tmp_path / a) if a in (*files, "MISSING") else a for a in args]
    code, _, err = run_cli(capsys, "extend", BUNDLED, "-o", tmp_path / "out", "-t", "2048", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_tune_checks_cheap_things_before_loading(capsys, tmp_path):
    code, _, err = run_cli(capsys, "tune", BUNDLED, "-o", tmp_path / "o", "-t", "2048",
                           "--methods", "yarn,magic")  # fmt: skip
    assert code == 2 and "unknown method 'magic'" in err
    code, _, err = run_cli(capsys, "tune", BUNDLED, "-o", tmp_path / "o", "-t", "128")
    assert code == 2 and "not longer than the trained length" in err
    code, _, err = run_cli(
        capsys, "tune", BUNDLED, "-o", tmp_path / "o", "-t", "2048", "--search-docs", "60"
    )
    assert code == 2 and "documents have at least 2048 tokens" in err
