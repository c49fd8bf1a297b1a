"""`ctxext eval --task context-use --task retrieval` end to end on a tiny real checkpoint."""

from __future__ import annotations

import json

import pytest
from conftest import BUNDLED, run_cli


def test_context_use_and_retrieval_results(tmp_path, tiny_llama_session, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        capsys, "eval", tiny_llama_session, "--task", "context-use", "--task", "retrieval",
        "--lengths", "64,128,192", "--local-window", "32", "--local-stride", "16",
        "--num-docs", "2", "--passkey-trials", "1", "-o", out, "--json",
        # Two held-out code forms that fit in 64 of this tokenizer's tokens (most need more).
        "--retrieval-template", "const-expect,let-assert-equal",
    )  # fmt: skip
    assert code == 0, err
    results = json.loads(stdout)
    (run,) = results["runs"]
    gains = run["context_use"]
    assert sorted(gains, key=int) == ["64", "128", "192"]
    assert gains["64"]["doc_fingerprint"] == gains["192"]["doc_fingerprint"]  # same documents
    assert gains["64"]["n_docs"] == gains["192"]["n_docs"] == 2
    assert gains["192"]["window"] == 32 and gains["192"]["stride"] == 16
    assert [b["end"] for b in gains["192"]["buckets"]] == [192]
    assert run["retrieval"]["template"] == "const-expect,let-assert-equal"
    assert run["retrieval"]["templates"] == ["const-expect", "let-assert-equal"]
    assert sorted(run["retrieval"]["by_template"]) == sorted(run["retrieval"]["templates"])
    assert run["retrieval"]["lengths"] == [64, 128, 192]
    assert run["context_length"] == 128
    assert "effective_length" in run  # its value: the known-answer test below
    proto = results["protocol"]
    assert proto["context_use"]["local_window"] == 32
    assert proto["retrieval"]["split"] == ["heldout"]
    assert "floor 50%" in proto["effective_length"] and "0.9 r" in proto["effective_length"]
    detail = run["effective_length_detail"]
    assert list(detail["families"]) == ["code-question"]  # both forms are of this family
    assert detail["reference"]["length"] == 128  # the unscaled row, at its trained length
    for name in ("results.json", "results.csv", "context_use.png", "retrieval_heatmap.png"):
        assert (out / name).is_file()
    csv_text = (out / "results.csv").read_text()
    assert (
        "far-context-gain-bits" in csv_text
        and "retrieval-const-expect,let-assert-equal" in csv_text
    )
    _check_headline(results)


def _check_headline(results: dict) -> None:
    """`ctxext run`'s closing summary of these results: the headline figures, in 80 columns."""
    from ctxext.report.cells import gain_interval
    from ctxext.report.summary import headline_summary

    text = headline_summary(results)
    lines = text.splitlines()
    assert lines[0].startswith("what to look at") and max(map(len, lines)) <= 80
    (run,) = results["runs"]
    assert run["label"] in lines
    last = run["context_use"]["192"]["buckets"][-1]
    assert "far-context gain @192 (bits/token, 95% interval; > 0: reads past 32):" in text
    assert f"    0-192       {gain_interval(last)}" in lines
    # Retrieval per family (pooled over its forms and depths, with its number of keys), not
    # per template: here both forms are code-question, 2 forms x 5 depths x 1 key = 10.
    detail = run["effective_length_detail"]
    (fam,) = detail["families"].values()
    cells = [detail["lengths"][n]["families"]["code-question"] for n in ("64", "128", "192")]
    assert [c["n"] for c in cells] == [10, 10, 10]
    row = next(x for x in lines if x.startswith("    code-question n=10 "))
    assert row.split()[2:5] == [
        f"{c['accuracy']:.0%}" + ("x" if c.get("passes") is False else "")
        + ("!" if c.get("one_key_decides") else "")
        for c in cells
    ]  # fmt: skip
    assert row.endswith("not judged" if not fam["counted"] else f"t {fam['threshold'] * 100:.3g}%")
    assert not any(x.startswith("    const-expect") for x in lines)
    from ctxext.report.cells import effective_reach

    assert f"  effective context length: {effective_reach(run)} (extended to 128)" in lines
    assert "    floor 50%; reference " in lines[lines.index(
        f"  effective context length: {effective_reach(run)} (extended to 128)") + 1]  # fmt: skip
    assert "r >= the floor 50%, against the threshold max(floor, 0.9 r)" in " ".join(lines)


def test_effective_length_known_answer_on_the_bundled_model(capsys):
    """The bundled model judged by the rule: the unscaled row is the reference (at its trained
    length 256), YaRN x2 is judged against it, and at a floor it reaches, the unscaled row
    reads to at least its trained length (r >= max(floor, 0.9 r)).

    Structural facts only, so that the test holds for any bundled model; the shipped model's
    figures are pinned by tests/test_bundled.py and tests/test_docs_figures.py."""
    if not (BUNDLED / "config.json").exists():
        pytest.skip("bundled model not built")
    args = ("eval", "-m", "yarn", "--lengths", "256,512", "--passkey-trials", "2", "--json",
            "--retrieval-template", "const-expect,let-assert-equal")  # fmt: skip
    code, stdout, err = run_cli(capsys, *args, "--task", "retrieval")
    assert code == 0, err
    base, yarn = json.loads(stdout)["runs"]
    assert (base["context_length"], yarn["context_length"]) == (256, 512)
    for run in (base, yarn):
        detail = run["effective_length_detail"]
        assert detail["reference"]["length"] == 256 and list(detail["families"]) == [
            "code-question"
        ]
        assert detail["reference"]["source"].endswith("own retrieval at 256, reused")
    (fam,) = base["effective_length_detail"]["families"].values()
    r = fam["reference"]["accuracy"]
    assert r == sum(map(sum, base["retrieval"]["accuracy"][:1])) / 5  # pooled over depths
    if fam["counted"]:  # the reference length passes its own threshold
        assert base["effective_length"] in (256, 512)
    else:  # no family judged, no far-context gain measured: nothing judged
        assert base["effective_length"] is None and yarn["effective_length"] is None


def test_templates_on_other_data_and_the_passkey_on_request(tmp_path, tiny_llama_session, capsys):
    data = tmp_path / "d.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    for flags, template in (([], "heldout"), (["--retrieval-template", "text"], "text")):
        code, stdout, err = run_cli(
            capsys, "eval", tiny_llama_session, "--task", "retrieval", "--data", data,
            "--lengths", "256", "--passkey-trials", "1", "--json", *flags,
        )  # fmt: skip
        assert code == 0, err
        (run,) = json.loads(stdout)["runs"]
        assert run["retrieval"]["template"] == template
    # The passkey prompt does not fit the trained length 128: no reference, retrieval not
    # judged (the evaluation itself goes on), and the line says why.
    detail = run["effective_length_detail"]
    assert detail["reference"]["source"].startswith(
        "not measured: its trained length 128 cannot hold the prompt (passkey length 128 is too short"
    )
    assert not detail["retrieval_judged"] and run["effective_length"] is None
    assert detail["families"]["text"]["note"].startswith("not judged: no reference: not measured")
    assert "retrieval not judged (no reference): nothing else measured" in err


def test_local_stride_above_window_is_refused(tiny_llama_session, capsys):
    code, _, err = run_cli(
        capsys, "eval", tiny_llama_session, "--task", "context-use", "--lengths", "64",
        "--local-window", "16", "--local-stride", "32",
    )  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "--local-stride" in err


def test_retrieval_scores_held_out_templates_by_default_and_refuses_unknown_ones():
    import pytest

    from ctxext.config import EvalConfig, parse_model
    from ctxext.errors import CtxextError

    assert EvalConfig(lengths=[256]).template == "heldout"
    assert EvalConfig(lengths=[256], retrieval_template="text").template == "text"
    with pytest.raises(CtxextError, match="unknown retrieval template 'nope'"):
        parse_model(EvalConfig, {"lengths": [256], "retrieval_template": "code,nope"}, "eval")
