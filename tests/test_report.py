"""report: the Markdown that report.md and model cards carry."""

from __future__ import annotations

from ctxext.report.markdown import context_use_markdown


def _bucket(gain: float, low: float, high: float) -> dict:
    return {"start": 512, "end": 1024, "gain_bits": gain, "ci_low": low, "ci_high": high}


def _results() -> dict:
    use = {
        "512": {"length": 512, "window": 256, "buckets": [_bucket(0.25, 0.125, 0.5)]},
        "1024": {"length": 1024, "window": 256, "buckets": [_bucket(-0.5, -0.75, -0.25)]},
    }
    retrieval = {
        "template": "code",
        "lengths": [512, 1024],
        "depths": [0.0, 1.0],
        "trials": 4,
        "accuracy": [[1.0, 0.5], [0.25, 0.0]],
    }
    runs = [
        {"label": "base", "ppl": {}},
        {
            "label": "m + yarn x4",
            "context_use": use,
            "retrieval": retrieval,
            "context_length": 1024,
            "effective_length": 512,
        },
        {
            "label": "m + ntk x4",
            "context_use": use,
            "context_length": 1024,
            "effective_length": None,
        },
    ]
    return {"config": {"lengths": [512, 1024]}, "runs": runs}


def test_context_use_markdown_states_effective_length_gain_and_retrieval():
    md = context_use_markdown(_results())
    lines = md.splitlines()
    assert lines[0] == "- m + yarn x4: extended to 1024, reads to 512"
    assert lines[1] == "- m + ntk x4: extended to 1024, reads to none of the lengths"
    assert "| m + yarn x4 | +0.250 (+0.125 to +0.500) | -0.500 (-0.750 to -0.250) |" in lines
    assert "| m + ntk x4 | +0.250 (+0.125 to +0.500) | -0.500 (-0.750 to -0.250) |" in lines
    assert "last 256 tokens" in md and "4 trials per cell" in md
    # Mean over depths, worst depth in brackets.
    assert "| m + yarn x4 | 75% (50%) | 12% (0%) |" in lines
    assert not any(line.startswith("| base |") for line in lines)


def test_context_use_markdown_is_none_without_context_tasks():
    assert context_use_markdown({"config": {"lengths": [256]}, "runs": [{"label": "b"}]}) is None


def test_context_use_table_stars_sure_gains_and_states_effective_length():
    from rich.console import Console

    from ctxext.report.tables import context_use_table

    console = Console(width=100, record=True)
    console.print(context_use_table(_results()))
    text = console.export_text()
    yarn = next(line for line in text.splitlines() if "yarn" in line)
    ntk = next(line for line in text.splitlines() if "ntk" in line)
    # Both intervals exclude 0 -> starred; the last column is the effective length.
    assert "+0.250*" in yarn and "-0.500*" in yarn and yarn.rstrip(" │").endswith("512")
    assert ntk.rstrip(" │").endswith("none")
    assert "base" not in text


def _with_key_tokens() -> dict:
    """Key tokens as an earlier ctxext wrote them: inside context-use, the drop alone."""
    results = _results()
    for run in results["runs"]:
        for n, res in run.get("context_use", {}).items():
            res["protocol"] = {"key_token_nats": 2.0}
            res["key_ppl"], res["key_fraction"] = (3.25, 0.0412) if n == "512" else (None, 0.0)
    return results


def _with_longppl() -> dict:
    """Key tokens as `--task longppl` writes them: their own key, the reference's rule."""
    from ctxext.evaluate.longppl import longppl_protocol

    results = _results()
    del results["runs"][2]["context_use"]  # a run may have LongPPL without the gain
    for run in results["runs"][1:]:
        run["longppl"] = {
            str(n): {"length": n, "window": 256, "stride": 64, "key_ppl": ppl,
                     "key_fraction": share, "protocol": longppl_protocol(256, 64, True)}
            for n, ppl, share in ((512, 3.25, 0.0412), (1024, None, 0.0))
        }  # fmt: skip
    return results


def _terminal(table) -> str:
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()


def test_key_tokens_in_the_report_and_the_terminal_table():
    """Both forms render, each stating its own protocol: the short context (window, stride)
    and the thresholds (the earlier one had no condition on the full-context NLL)."""
    from ctxext.report.tables import key_token_table

    old, new = _with_key_tokens(), _with_longppl()
    for results in (old, new):
        md = context_use_markdown(results)
        assert "| m + yarn x4 | 3.25 (4.1%) | none |" in md.splitlines(), md
        yarn = next(
            line for line in _terminal(key_token_table(results)).splitlines() if "yarn" in line
        )
        assert "3.25 (4.1%)" in yarn and "none" in yarn
    md = context_use_markdown(old)
    assert (
        "more than 2 nats from a local window of 256 positions to the full context, with no " in md
    )
    assert "condition on the full-context NLL" in md
    md = context_use_markdown(new)
    assert (
        "more than 2 nats from the short context (chunks of 320 positions every 64: the last "
        "256 to 319 positions) to the full context and its full-context NLL is below 2 nats" in md
    )
    assert "| m + ntk x4 | 3.25 (4.1%) | none |" in md.splitlines()  # LongPPL without the gain
    caption = " ".join(_terminal(key_token_table(new)).split())
    assert "the last 256 to 319 positions) to the full context and its full-context NLL" in caption
    # LongPPL alone (no context-use, no retrieval) still renders its table.
    alone = {"config": {"lengths": [512, 1024]}, "runs": [new["runs"][2]]}
    assert "| m + ntk x4 | 3.25 (4.1%) | none |" in context_use_markdown(alone).splitlines()
    # results.json files without key-token figures render as before.
    assert "LongPPL" not in context_use_markdown(_results())
    assert key_token_table(_results()) is None
