"""Where the effective length's reference comes from (the unscaled model at its trained length,
reused from the unscaled row or scored once before the rows, a scaled checkpoint with its
original rope), and how `ctxext eval` reports the rule, on real models.

No accuracy is pinned: the bundled model is retrained from time to time; every check here is a
consistency check between the figures results.json carries. (The coordinator re-pins figures
after a retrain, in tests/test_evaluate_run_context.py.)"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from conftest import BUNDLED, run_cli

from ctxext import rope
from ctxext.cli.app import main
from ctxext.evaluate.needles import HELDOUT_FAMILIES


def _family_tally(retrieval: dict, templates: list[str], length: int) -> tuple[int, int]:
    """hits, n of ``templates`` at ``length``, pooled over depths, from results.json's figures."""
    i = retrieval["lengths"].index(length)
    per = retrieval["trials"] // len(retrieval["templates"])
    hits = sum(round(a * per) for t in templates for a in retrieval["by_template"][t][i])
    return hits, per * len(retrieval["depths"]) * len(templates)


def _check_detail(run: dict, reference: dict, floor: float) -> None:
    """The rule, recomputed from the run's own figures and the reference's (no values pinned)."""
    detail = run["effective_length_detail"]
    assert detail["floor"] == floor and detail["relative"] == 0.9
    judged = {}
    for family, fam in detail["families"].items():
        r = fam["reference"]
        assert (r["hits"], r["n"]) == (reference[family]["hits"], reference[family]["n"])
        assert fam["counted"] == (r["hits"] / r["n"] >= floor)
        if fam["counted"]:
            assert fam["threshold"] == pytest.approx(max(floor, 0.9 * r["hits"] / r["n"]))
            judged[family] = fam["threshold"]
        else:
            assert fam["threshold"] is None and "below the floor" in fam["note"]
    assert detail["retrieval_judged"] == bool(judged)
    failed = False
    for n, entry in detail["lengths"].items():
        for family, cell in entry["families"].items():
            templates = detail["families"][family]["templates"]
            assert (cell["hits"], cell["n"]) == _family_tally(run["retrieval"], templates, int(n))
            assert cell["ci_low"] <= cell["accuracy"] <= cell["ci_high"]
            if family in judged:
                assert cell["passes"] == (cell["accuracy"] >= judged[family] - 1e-9)
        passes = all(entry["families"][f]["passes"] for f in judged)
        assert entry["passes"] == passes  # retrieval only: no far-context gain here
        assert entry["counts"] == (bool(judged) and passes and not failed)
        failed = failed or not passes
    counted = [int(n) for n, e in detail["lengths"].items() if e["counts"]]
    assert run["effective_length"] == (max(counted) if counted else None)


#: Two of the five default depths: every form of every family still at each length (the
#: module's evaluations are of the bundled model, all forms, twice).
TWO_DEPTHS = ("--passkey-depths", "0.25,0.75")


@pytest.fixture(scope="module")
def bundled_yarn() -> tuple[dict, str]:
    """`ctxext eval -m yarn --lengths 256,512 --task retrieval` (at TWO_DEPTHS) on the bundled
    model, once for the module: results.json and what the terminal shows (stderr, with --json)."""
    if not (BUNDLED / "config.json").exists():
        pytest.skip("bundled model not built")
    out, err = io.StringIO(), io.StringIO()
    with (
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        pytest.raises(SystemExit) as exc,
    ):
        main(["eval", "-m", "yarn", "--lengths", "256,512", "--task", "retrieval",
              "--passkey-trials", "1", *TWO_DEPTHS, "--json"])  # fmt: skip
    assert exc.value.code in (0, None), err.getvalue()
    return json.loads(out.getvalue()), err.getvalue()


def test_the_unscaled_row_at_the_trained_length_is_the_reference(bundled_yarn):
    results, err = bundled_yarn
    base, yarn = results["runs"]
    assert (base["method"], yarn["method"]) == (None, "yarn")
    for run in (base, yarn):
        detail = run["effective_length_detail"]
        assert detail["reference"]["length"] == 256 == base["trained_length"]
        assert (
            detail["reference"]["source"] == "the row stdlib-llama's own retrieval at 256, reused"
        )
        assert tuple(detail["families"]) == HELDOUT_FAMILIES
        reference = {
            f: dict(
                zip(
                    ("hits", "n"),
                    _family_tally(base["retrieval"], fam["templates"], 256),
                    strict=True,
                )
            )
            for f, fam in detail["families"].items()
        }
        _check_detail(run, reference, 0.5)
        # Printed with the floor and every family's reference beside it.
        ref = detail["families"]["code-binding"]["reference"]
        line = (
            f"effective context: {run['label']}: extended to {run['context_length']}, "
            f"{'not judged' if not detail['basis'] else 'reads to'}"
        )
        printed = next(x for x in err.splitlines() if x.startswith(line))
        assert "(floor 50%; reference stdlib-llama unscaled @256: code-binding " in printed
        assert f"code-binding {ref['accuracy']:.0%} ({ref['hits']}/{ref['n']}) -> " in printed
        for family in HELDOUT_FAMILIES:
            assert f" {family} " in printed
    assert "floor 50%" in results["protocol"]["effective_length"]
    assert "RULER" in results["protocol"]["effective_length"]
    assert "effective length: retrieval per family" in err  # the table


def test_without_an_unscaled_row_the_reference_is_scored_once_with_the_same_keys(
    bundled_yarn, capsys
):
    """--no-base, only 512: the reference (the bundled model unscaled at 256) is scored before
    the row, with the same seed: at the first length, the same keys as the unscaled row of
    ``bundled_yarn``, so the same figures."""
    results, _ = bundled_yarn
    code, stdout, err = run_cli(
        capsys, "eval", "-m", "yarn", "--no-base", "--lengths", "512", "--task", "retrieval",
        "--passkey-trials", "1", *TWO_DEPTHS, "--json",
    )  # fmt: skip
    assert code == 0, err
    (run,) = json.loads(stdout)["runs"]
    detail = run["effective_length_detail"]
    assert detail["reference"]["length"] == 256
    assert detail["reference"]["source"].startswith(
        "scored once before the rows: stdlib-llama, unscaled, at 256"
    )
    assert "keys drawn after" not in detail["reference"]["source"]  # 256: no shorter length
    before = results["runs"][0]["effective_length_detail"]["families"]
    assert {f: x["reference"] for f, x in detail["families"].items()} == {
        f: x["reference"] for f, x in before.items()
    }
    _check_detail(run, {f: x["reference"] for f, x in before.items()}, 0.5)


TWO_FORMS = ("--retrieval-template", "const-expect,let-assert-equal")  # fit in 64 tiny tokens


def test_a_scaled_checkpoint_is_judged_against_its_weights_with_the_original_rope(
    tmp_path, tiny_llama_session, capsys
):
    ext = tmp_path / "ext"
    code, _, err = run_cli(capsys, "extend", tiny_llama_session, "-o", ext, "-m", "yarn", "-f", "2")
    assert code == 0, err
    args = ("--task", "retrieval", "--lengths", "128,256", "--passkey-trials", "2", "--json",
            "--effective-threshold", "0.25", *TWO_FORMS)  # fmt: skip
    code, stdout, err = run_cli(capsys, "eval", ext, *args)
    assert code == 0, err
    (run,) = json.loads(stdout)["runs"]
    detail = run["effective_length_detail"]
    assert detail["reference"]["length"] == 128  # the original trained length
    assert detail["reference"]["model"] == f"{ext} (rope as trained)"
    assert "with the rope it was trained with" in detail["reference"]["source"]
    # The same weights unscaled, as the original checkpoint's own row: the same figures.
    code, stdout, err = run_cli(capsys, "eval", tiny_llama_session, *args)
    assert code == 0, err
    (own,) = json.loads(stdout)["runs"]
    mine = own["effective_length_detail"]
    assert mine["reference"]["source"].endswith("own retrieval at 128, reused")
    refs = {f: x["reference"] for f, x in mine["families"].items()}
    assert {f: x["reference"] for f, x in detail["families"].items()} == refs
    assert list(refs) == ["code-question"]  # both forms are of one family
    _check_detail(run, refs, 0.25)


def test_rope_as_trained_loads_the_scaled_weights_as_the_unscaled_model(
    tmp_path, tiny_llama_session, capsys
):
    import torch

    from ctxext.modeling import load_causal_lm

    ext = tmp_path / "ext"
    code, _, err = run_cli(capsys, "extend", tiny_llama_session, "-o", ext, "-m", "yarn", "-f", "2")
    assert code == 0, err
    ids = torch.arange(1, 121).unsqueeze(0)
    logits = {}
    for name, model, as_trained in (("base", tiny_llama_session, False), ("scaled", ext, False),
                                    ("as trained", ext, True)):  # fmt: skip
        loaded = load_causal_lm(str(model), dtype="float32", rope_as_trained=as_trained)
        with torch.no_grad():
            logits[name] = loaded.model(ids).logits
    assert torch.equal(logits["as trained"], logits["base"])
    assert not torch.allclose(logits["scaled"], logits["base"])


def test_original_config_undoes_a_scaling_where_the_config_records_it():
    cfg = json.loads((BUNDLED / "config.json").read_text()) if BUNDLED.exists() else None
    if cfg is None:
        pytest.skip("bundled model not built")
    assert rope.original_config(cfg) == cfg  # unscaled: unchanged
    for method in ("linear", "dynamic", "yarn", "llama3"):
        scaled = rope.extend_config(cfg, method, factor=4)
        original = rope.original_config(scaled)
        info, before = rope.analyze(original), rope.analyze(cfg)
        assert info.existing_scaling is None, method
        assert (info.rope_theta, info.trained_length) == (before.rope_theta, 256)
        assert original["max_position_embeddings"] == 256
        assert original["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    # Static NTK rewrites theta without keeping the original: not recorded.
    assert rope.original_config(rope.extend_config(cfg, "ntk", factor=4)) is None


def test_the_floor_is_checked_before_any_model_work(capsys, tmp_path):
    for bad in ("0", "1.5", "nan", "-0.1"):
        code, _, err = run_cli(capsys, "eval", tmp_path / "no-such-model", "--task", "retrieval",
                               "--lengths", "256", "--effective-threshold", bad)  # fmt: skip
        assert code == 2 and err.count("\n") == 1, err
        assert "--effective-threshold" in err and "(0, 1]" in err
    code, _, err = run_cli(capsys, "run", "tiny-yarn", "eval.effective_threshold=2", "--dry-run")
    assert code == 2 and "effective_threshold" in err and "(0, 1]" in err


def test_a_named_reference_model_judges_every_row(tiny_llama_session, capsys):
    """--reference-model: the tiny Llama (trained at 128) judged against the bundled model's
    unscaled retrieval at its own trained length 256, scored once before the row, with the same
    data, templates, depths, trials, seed and keys as the bundled model's own row at 256 gives
    (keys are drawn from one seeded stream in length order, so the reference is scored after
    the shorter lengths, 128 here); a reference that is a row (by another name) is that row's,
    reused."""
    if not (BUNDLED / "config.json").exists():
        pytest.skip("bundled model not built")
    args = ("--task", "retrieval", "--passkey-trials", "2", "--json",
            "--effective-threshold", "0.25", *TWO_DEPTHS, *TWO_FORMS)  # fmt: skip
    code, stdout, err = run_cli(
        capsys, "eval", tiny_llama_session, "--lengths", "128,256", *args,
        "--reference-model", "stdlib-llama",
    )  # fmt: skip
    assert code == 0, err
    results = json.loads(stdout)
    assert results["config"]["reference_model"] == "stdlib-llama"
    (run,) = results["runs"]
    detail = run["effective_length_detail"]
    assert (detail["reference"]["model"], detail["reference"]["length"]) == ("stdlib-llama", 256)
    assert detail["reference"]["source"].startswith(
        "scored once before the rows: stdlib-llama, unscaled, at 256"
    )
    assert "keys drawn after the lengths [128], as a row's" in detail["reference"]["source"]
    named = {f: x["reference"] for f, x in detail["families"].items()}
    # The bundled model's own row at 256, the reference named by its folder: one model however
    # named, so its row is reused (not scored again), with the same reference figures.
    code, stdout, err = run_cli(
        capsys, "eval", "stdlib-llama", "--lengths", "128,256", *args, "--reference-model", BUNDLED
    )
    assert code == 0, err
    own = json.loads(stdout)["runs"][0]["effective_length_detail"]
    assert own["reference"]["source"] == "the row stdlib-llama's own retrieval at 256, reused"
    assert {f: x["reference"] for f, x in own["families"].items()} == named
    _check_detail(run, named, 0.25)
