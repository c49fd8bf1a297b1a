"""benchmarks/bench_context_finetune.py: its checks, the fine-tune commands it plans (one
LongCE fine-tune per learning rate), and its tables and plots drawn from real `ctxext eval`
results (a tiny real checkpoint; the fine-tunes themselves are the benchmark's to run, not a
test's)."""

from __future__ import annotations

import copy
import importlib.util
import re
import sys
from pathlib import Path

import pytest

from ctxext.errors import CtxextError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", name="bench")
def bench_fixture():
    path = ROOT / "benchmarks" / "bench_context_finetune.py"
    spec = importlib.util.spec_from_file_location("bench_context_finetune", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while defined
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", name="evaluated")
def evaluated_fixture(tiny_llama_session):
    """What `ctxext eval` computes with the benchmark's four tasks (window 32: every bucket is
    beyond it), through the Python API the CLI calls."""
    from ctxext.config import EvalConfig
    from ctxext.evaluate.run import run_eval
    from ctxext.evaluate.variants import Variant

    cfg = EvalConfig(
        lengths=[64, 600],
        tasks=["ppl", "context-use", "retrieval", "longppl"],
        num_docs=2,
        passkey_trials=1,
        local_window=32,
        retrieval_template="const-expect,let-assert-equal",
    )
    return run_eval([Variant(str(tiny_llama_session))], cfg)


def test_merge_labels_each_variant_and_renders_its_tables(bench, evaluated, tmp_path):
    from ctxext.report.files import write_outputs

    args = bench.parse_args(["--steps", "3", "--lengths", "64,600", "--num-docs", "2"])
    chosen = bench.check_args(args)
    longce = ["longce-lr0.0005", "longce-lr0.00013", "longce-lr3.5e-05"]
    assert list(chosen) == ["yarn", "ce", *longce, "mix"] and args.warmup == 1
    evals = {name: {"results": copy.deepcopy(evaluated)} for name in ("yarn", "mix")}
    results = bench.merge(evals, chosen)
    assert [r["label"] for r in results["runs"]] == [chosen["yarn"].label, chosen["mix"].label]
    assert (
        chosen["mix"].label == "CE + mix (stdlib:0.7, multikey:0.3; task episodes from 256 tokens)"
    )
    assert chosen["mix"].finetune[-2:] == ("--task-min-length", "256")

    tunes = {"mix": {"wall_s": 90.0, "cpu_s": 80.0, "summary": {"steps": 3, "seconds": 60.0,
             "tokens": 6144, "final_loss": 2.5}}}  # fmt: skip
    results["benchmark"] = {"command": "python benchmarks/bench_context_finetune.py",
                            "machine": "here", "finished": "now", "total_s": 1.0,
                            "compute_s": 2.0}  # fmt: skip
    results["runs"][1]["retrieval"]["accuracy"][1] = [1.0, 1.0, 0.5, 1.0, 1.0]
    text = bench.markdown(args, results, tunes, {"yarn": chosen["yarn"], "mix": chosen["mix"]})
    run = evaluated["runs"][0]
    # Far-context gain of every bucket beyond the window at the longest length, with its CI.
    far = run["context_use"]["600"]["buckets"]
    assert [(b["start"], b["end"]) for b in far] == [(0, 256), (256, 512), (512, 600)]
    head = "| variant | " + " | ".join(f"{b['start']}-{b['end']}" for b in far) + " |"
    assert head in text
    assert f"{far[-1]['gain_bits']:+.3f} ({far[-1]['ci_low']:+.3f} to " in text
    # Retrieval per length: mean over depths / worst depth (a random model retrieves nothing,
    # so the mix row gets other figures to tell mean, worst and lengths apart).
    assert "| 0% / 0% | 0% / 0% |" in text
    assert (
        "| CE + mix (stdlib:0.7, multikey:0.3; task episodes from 256 tokens) | 0% / 0% | 90% / 50% |"
        in text
    )
    summary = next(line for line in text.splitlines() if line.startswith("| CE + mix"))
    assert f"| 1.5 | {run['ppl']['64']['ppl']:.2f} | {run['ppl']['600']['ppl']:.2f} |" in summary
    key = run["longppl"]["600"]  # LongPPL at the longest length, its own task
    cell = "none" if key["key_ppl"] is None else f"{key['key_ppl']:.2f} ({key['key_fraction']:.1%})"
    assert f" | {cell} | 90% / 50% | " in summary
    assert "longppl" in bench.eval_argv(args, ["m"], tmp_path / "e")
    assert "6,144 | 20.00 | 2.5000 |" in text  # tokens, s / step, final loss of the fine-tune
    assert "none of them used in training" not in text  # named templates, not the held-out set

    written = {p.name for p in write_outputs(results, tmp_path)}
    assert {"context_use.png", "retrieval_heatmap.png", "ppl_vs_length.png"} <= written


def test_evals_of_other_documents_are_refused(bench, evaluated):
    chosen = {v.name: v for vs in bench.variants(list(bench.DEFAULT_MIX)).values() for v in vs}
    other = copy.deepcopy(evaluated)
    other["data"]["fingerprint"] = "0" * 16
    evals = {"yarn": {"results": evaluated}, "ce": {"results": other}}
    with pytest.raises(bench.BenchError, match="the ce eval read other documents"):
        bench.merge(evals, chosen)


def test_bad_options_are_refused_before_anything_runs(bench):
    # check_args alone: a check that failed to refuse must not start the benchmark here.
    for argv, words in (
        (["--variants", "ce,nope"], "unknown ['nope']"),
        (["--steps", "20", "--warmup", "20"], "--warmup (20) must be below --steps (20)"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--mix", "stdlib:0", "--variants", "mix"], "mix weights sum to 0"),
        (["--lengths", "256,x"], "--lengths must be positive integers"),
        (["--longce-lrs", "1e-4,0"], "--longce-lrs must be comma-separated positive numbers"),
        (["--longce-lrs", "1e-4,x"], "--longce-lrs must be comma-separated positive numbers"),
        (["--longce-lrs", "1e-4,0.0001"], "--longce-lrs lists a learning rate twice"),
    ):
        with pytest.raises((bench.BenchError, CtxextError), match=re.escape(words)):
            bench.check_args(bench.parse_args(argv))


def test_a_refusal_is_one_line_and_exit_2(bench, tmp_path, capsys):
    argv = ["--variants", "nope", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == "bench_context_finetune: error: --variants: unknown ['nope']; pick from yarn, "
        "ce, longce, mix"
    )
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


def test_longce_runs_at_each_of_its_learning_rates(bench, tmp_path):
    """One LongCE fine-tune per --longce-lrs, each with its own --lr and work folder; the other
    fine-tunes keep --lr. The default three hold the paper's lr scaled to this model."""
    import json

    args = bench.parse_args(["--steps", "3", "--longce-lrs", "1e-3,2e-4,4e-5"])
    chosen = bench.check_args(args)
    names = ["longce-lr0.001", "longce-lr0.0002", "longce-lr4e-05"]
    assert list(chosen) == ["yarn", "ce", *names, "mix"]
    for name, lr in zip(names, ("0.001", "0.0002", "4e-05"), strict=True):
        argv = bench.finetune_argv(args, chosen[name], tmp_path / name)
        assert argv[argv.index("--lr") + 1] == lr and argv[-3:] == ["--loss", "longce", "--json"]
        assert chosen[name].label == f"LongCE (stdlib, lr {float(lr):g})"
    ce = bench.finetune_argv(args, chosen["ce"], tmp_path / "ce")
    assert ce[ce.index("--lr") + 1] == str(args.lr)
    tunes = {n: {"summary": {}} for n in names[:1]}
    assert "`--data stdlib --loss longce --lr 0.001`" in bench.finetune_table(tunes, chosen)[2]
    # The paper's LongCE lr (2e-5 on Llama-2-7B, pre-trained at 3e-4) scaled to the bundled
    # model by the same fine-tune / pre-training ratio is one of the default three.
    trained = json.loads((ROOT / "ctxext/bundled/stdlib-llama/training.json").read_text())
    scaled = trained["lr"] * bench.PAPER_LONGCE_LR / bench.LLAMA2_7B_PRETRAIN_LR
    assert pytest.approx(scaled, rel=0.05) == bench.PAPER_SCALED_LONGCE_LR
    assert bench.PAPER_SCALED_LONGCE_LR in bench.DEFAULT_LONGCE_LRS
    assert len(bench.DEFAULT_LONGCE_LRS) == 3
