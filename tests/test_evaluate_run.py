"""`ctxext eval` end to end: variants side by side, protocol stated, output files, plots."""

from __future__ import annotations

import csv
import io
import json
import math
import resource
import subprocess
import sys

import pytest
import torch
from conftest import run_cli, tree_hash
from transformers import AutoModelForCausalLM, AutoTokenizer

from ctxext.config import EvalConfig, ExtendConfig
from ctxext.evaluate.variants import Variant, plan_variants


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


@pytest.fixture
def mixed_lengths_file(tmp_path):
    """Three long held-out files and one short one (eligible at 128 tokens, not at 512)."""
    from ctxext.corpus import stdlib_documents

    held = list(stdlib_documents("heldout"))
    docs = [d.text for d in held if len(d.text) > 4000][:3]
    docs.append(next(d.text for d in held if 700 < len(d.text) < 900))
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return path


def _results(capsys, *args):
    code, stdout, err = run_cli(capsys, "eval", *args, "--json")
    assert code == 0, err
    return json.loads(stdout)


def test_same_documents_at_every_length_in_results_json(capsys, tiny_llama, mixed_lengths_file):
    args = (tiny_llama, "--lengths", "128,512,1024", "--data", mixed_lengths_file, "-m", "yarn")
    same = _results(capsys, *args)
    assert same["config"]["doc_selection"] == "same"
    assert same["protocol"]["ppl"]["doc_selection"] == "same"
    for run in same["runs"]:
        assert len({r["doc_fingerprint"] for r in run["ppl"].values()}) == 1
        assert {r["n_docs"] for r in run["ppl"].values()} == {3}
        for res in run["ppl"].values():  # bits per byte and bytes per token for every run
            assert res["bits_per_byte"] > 0 and res["bytes_per_token"] > 1
            assert res["bits_per_byte"] == pytest.approx(
                res["nll_sum"] / (math.log(2) * res["n_bytes"])
            )
    per = _results(capsys, *args, "--doc-selection", "per-length")
    base = per["runs"][0]["ppl"]
    assert [base[n]["n_docs"] for n in ("128", "512", "1024")] == [4, 3, 3]
    assert base["128"]["doc_fingerprint"] != base["512"]["doc_fingerprint"]
    assert base["1024"] == same["runs"][0]["ppl"]["1024"] | {"protocol": base["1024"]["protocol"]}


def test_rows_with_different_tokenizers_show_bits_per_byte(capsys, tmp_path, tiny_llama, data_file):
    out = tmp_path / "res"
    code, stdout, err = run_cli(
        capsys, "eval", tiny_llama, "stdlib-llama", "--lengths", "128,256", "--data", data_file,
        "-o", out,
    )  # fmt: skip
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert len({r["tokens_fingerprint"] for r in results["runs"]}) == 2
    assert "bits per byte" in stdout and "perplexities do not compare" in stdout
    from ctxext.report.cells import metric, series

    assert metric(results) == "bpb"
    assert [ys for _, _, ys in series(results)] == [
        [r["ppl"][n]["bits_per_byte"] for n in ("128", "256")] for r in results["runs"]
    ]
    same_tok = _results(capsys, tiny_llama, "--lengths", "256", "--data", data_file, "-m", "ntk")
    assert metric(same_tok) == "ppl"


def test_results_json_is_strict(tmp_path, tiny_llama, data_file):
    """An overflowed perplexity is written as null with a note, never as Infinity."""
    from ctxext.evaluate.run import run_eval
    from ctxext.report.files import write_outputs

    cfg = EvalConfig(lengths=[128], data=str(data_file))
    results = run_eval(plan_variants([str(tiny_llama)], [], {}, cfg), cfg)
    results["runs"][0]["ppl"]["128"]["ppl"] = math.inf  # what an overflowing model gets
    results["runs"][0]["ppl"]["128"]["ci_high"] = math.nan
    write_outputs(results, tmp_path)

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    strict = json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)
    assert strict["runs"][0]["ppl"]["128"]["ppl"] is None
    assert strict["runs"][0]["ppl"]["128"]["ci_high"] is None
    assert strict["notes"] == [
        "runs[0].ppl.128.ppl was inf (written as null)",
        "runs[0].ppl.128.ci_high was nan (written as null)",
    ]


def test_evaluate_and_report_calls_its_hooks_in_order(tmp_path, monkeypatch, tiny_llama, data_file):
    """The pipeline below the CLI: the check gets the variants per model, progress wraps the
    evaluation, rendering sees the results before the folder exists, the folder is written
    atomically and then announced by its absolute path."""
    import contextlib

    from ctxext.evaluate.run import EvalHooks, evaluate_and_report

    cfg = EvalConfig(lengths=[128, 256], data=str(data_file))
    out = tmp_path / "res"
    events: list[tuple] = []

    def budget(per_model):
        events.append(("budget", per_model))
        return lambda sources, token_cache: events.append(
            ("check", [str(s.path) for s in sources.values()], sorted(token_cache))
        )

    @contextlib.contextmanager
    def progress():
        events.append(("progress",))

        def factory(what, total):
            events.append(("task", what))
            return lambda done: None

        yield factory
        events.append(("progress done",))

    def render(results):
        events.append(("render", len(results["runs"]), out.exists()))

    def written(path):
        events.append(("written", path, (path / "results.json").is_file()))

    monkeypatch.chdir(tmp_path)  # a relative output is announced made absolute
    hooks = EvalHooks(budget, progress, render, written)
    results = evaluate_and_report(
        [str(tiny_llama)], ["yarn"], {}, cfg, out.relative_to(tmp_path), False, hooks=hooks
    )
    assert [r["label"] for r in results["runs"]] == [f"{tiny_llama}", f"{tiny_llama}+yarn x2"]
    names = [e[0] for e in events]
    assert names[:3] == ["budget", "progress", "check"] and events[0] == ("budget", 2)
    assert events[2] == ("check", [str(tiny_llama)], [str(tiny_llama)])
    assert names.index("task") < names.index("progress done") < names.index("render")
    assert events[-2:] == [("render", 2, False), ("written", out, True)]
    assert json.loads((out / "results.json").read_text())["runs"] == json.loads(
        json.dumps(results["runs"])
    )


def test_evaluate_and_report_checks_the_output_before_anything_slow(tmp_path, tiny_llama):
    from ctxext.errors import CtxextError
    from ctxext.evaluate.run import EvalHooks, evaluate_and_report

    (tmp_path / "taken").mkdir()
    called = []
    hooks = EvalHooks(budget=lambda n: called.append(n), progress=lambda: called.append(1))
    cfg = EvalConfig(lengths=[128])
    with pytest.raises(CtxextError, match="already exists"):
        evaluate_and_report([str(tiny_llama)], [], {}, cfg, tmp_path / "taken", False, hooks=hooks)
    with pytest.raises(CtxextError, match="inside the input"):
        evaluate_and_report([str(tiny_llama)], [], {}, cfg, tiny_llama / "o", True, hooks=hooks)
    assert called == [] and not (tiny_llama / "o").exists()


def test_preflight_refuses_the_readme_example_in_seconds(tmp_path, capsys):
    """`ctxext eval stdlib-llama OUT -m yarn`, OUT already extended: refused before any model
    loads, in one line naming OUT and the method (a fresh process, imports included)."""
    out = tmp_path / "OUT"
    cli = [sys.executable, "-m", "ctxext"]
    assert run_cli(capsys, "extend", "-o", out, "-m", "yarn", "-f", "4")[0] == 0  # (setup)
    # CPU-seconds of the refusing process, not wall time: the claim is about the work done
    # before refusing (no model loaded, no evaluation), which a busy machine does not change.
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        [*cli, "eval", "stdlib-llama", str(out), "-m", "yarn"], capture_output=True, text=True
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"error: {out} (-m yarn): ")
    assert "already scaled" in proc.stderr and proc.stdout == ""
    assert seconds < 3, f"refusal took {seconds:.1f} CPU-seconds"
    # What keeps it cheap, independent of the machine's speed: torch is never imported (its
    # import alone is 2-3 CPU-seconds here).
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "ctxext", "eval", "stdlib-llama", str(out),
         "-m", "yarn"], capture_output=True, text=True,
    )  # fmt: skip
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()}
    assert proc.returncode == 2 and "ctxext.evaluate.run" in imported
    assert "torch" not in imported and "transformers" not in imported


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["-m", "yarn", "--lengths", "128,256"],
            "stdlib-llama (-m yarn): target length 256 is not",
        ),
        (["--lengths", "256,999999"], "stdlib-llama: no document has at least 999999 tokens"),
        (["--task", "passkey", "--lengths", "16"], "stdlib-llama: passkey length 16 is too short"),
    ],
)
def test_preflight_refusals_name_the_model_and_method(capsys, args, message):
    code, stdout, err = run_cli(capsys, "eval", "stdlib-llama", *args)
    assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1
    assert "ppl" not in stdout  # no table: nothing was evaluated
