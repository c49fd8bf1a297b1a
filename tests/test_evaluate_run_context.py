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
    assert "90%" in proto["effective_length"]
    for name in ("results.json", "results.csv", "context_use.png", "retrieval_heatmap.png"):
        assert (out / name).is_file()
    csv_text = (out / "results.csv").read_text()
    assert "far-context-gain-bits" in csv_text and "retrieval-const-expect,let-assert-equal" in csv_text
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
    acc = run["retrieval"]["accuracy"]
    pooled = "".join(f"{sum(row) / len(row):>6.0%}" for row in acc)
    assert f"    {'all (pooled)':<17}{pooled}" in lines  # names padded to the longest
    for name, rows in run["retrieval"]["by_template"].items():
        cells = "".join(f"{sum(row) / len(row):>6.0%}" for row in rows)
        assert f"    {name:<17}{cells}" in lines
    reach = run["effective_length"]
    read = f"reads to {reach}" if reach else "reads to none of the lengths"
    assert f"  effective context length: {read} (extended to 128)" in lines
    assert "retrieval accuracy >= 90% at every depth" in " ".join(lines)


def test_effective_length_known_answer_on_the_bundled_model(capsys):
    """The bundled model retrieves every key of the held-out code templates at its trained
    length 256 and not at 512 unscaled, so on retrieval alone it reads to 256. YaRN x2 (to 512)
    does not retrieve at 256 in these forms (measured 0-50% per depth), so it reads to none."""
    if not (BUNDLED / "config.json").exists():
        pytest.skip("bundled model not built")
    args = ("eval", "-m", "yarn", "--lengths", "256,512", "--passkey-trials", "2", "--json",
            "--retrieval-template", "const-expect,let-assert-equal")  # fmt: skip
    code, stdout, err = run_cli(capsys, *args, "--task", "retrieval")
    assert code == 0, err
    base, yarn = json.loads(stdout)["runs"]
    assert base["retrieval"]["accuracy"][0] == [1.0] * 5
    assert max(base["retrieval"]["accuracy"][1]) < 0.9
    assert min(yarn["retrieval"]["accuracy"][0]) < 0.9
    assert (base["context_length"], base["effective_length"]) == (256, 256)
    assert (yarn["context_length"], yarn["effective_length"]) == (512, None)


def test_templates_on_other_data_and_the_passkey_on_request(tmp_path, tiny_llama_session, capsys):
    data = tmp_path / "d.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    for flags, template in (([], "heldout"), (["--retrieval-template", "text"], "text")):
        code, stdout, err = run_cli(
            capsys, "eval", tiny_llama_session, "--task", "retrieval", "--data", data,
            "--lengths", "256", "--passkey-trials", "1", "--json", *flags,
        )  # fmt: skip
        assert code == 0, err
        assert json.loads(stdout)["runs"][0]["retrieval"]["template"] == template


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
