"""Data mixes: seeded draws by weight, synthetic long-range task sequences, a one-source mix
trains exactly as that source alone, and the mix is recorded in the checkpoint's provenance.
(Resuming a mixed run exactly: tests/test_finetune_state.py.)"""

from __future__ import annotations

import copy
import itertools
import json
import resource
import subprocess
import sys

import numpy as np
import pytest
from conftest import BUNDLED, finetune_cfg, max_weight_diff, model_weights

from ctxext.config import ExtendConfig, TaskOptions
from ctxext.errors import CtxextError
from ctxext.finetune.data import mix_draws
from ctxext.finetune.loop import run_finetune

YARN2 = ExtendConfig(method="yarn", factor=2)  # 128 -> 256


def test_draws_follow_the_weights_and_depend_on_seed_and_sample_only():
    weights = [0.6, 0.3, 0.0, 0.1]
    n = 20_000
    draws = mix_draws(weights, seed=7, count=n)
    counts = np.bincount(draws, minlength=4)
    for k, w in enumerate(weights):
        sigma = (n * w * (1 - w)) ** 0.5
        assert abs(counts[k] - n * w) <= 4 * sigma + 1e-9, (k, counts[k])
    assert counts[2] == 0  # weight 0: never drawn
    # Sample i's source is a function of (seed, i): a longer run, or a resumed one, agrees.
    assert mix_draws(weights, seed=7, count=500) == draws[:500]
    assert mix_draws([6, 3, 0, 1], seed=7, count=500) == draws[:500]  # only ratios matter
    assert mix_draws(weights, seed=8, count=500) != draws[:500]


@pytest.fixture(scope="module")
def bundled_tok_and_filler():
    from ctxext.bundled_train import packed_stream
    from ctxext.corpus import stdlib_documents
    from ctxext.modeling import load_tokenizer

    tok = load_tokenizer(BUNDLED)
    docs = [d.text for d in itertools.islice(stdlib_documents("train"), 40)]
    return tok, packed_stream(tok, docs)


@pytest.mark.parametrize("task", ["retrieval", "multikey", "multihop"])
def test_task_sequences_spread_facts_over_the_length_and_answer_right(bundled_tok_and_filler, task):
    from ctxext.needles import templates_of
    from ctxext.synthetic import draw_task, needle_ids, task_sequence

    tok, stream = bundled_tok_and_filler
    length, options = 512, TaskOptions(keys=4, queries=2, hops=3)
    train = {t.name for t in templates_of("train")}
    depths, used = [], set()
    for i in range(60):
        rng = np.random.default_rng([5, i])
        filler = stream[(start := int(rng.integers(0, len(stream) - length))) : start + length]
        twin = copy.deepcopy(rng)
        draw = draw_task(task, options, rng)
        seq = needle_ids(tok, filler, length, draw)
        assert task_sequence(tok, task, options, filler, length, twin) == seq
        assert len(seq.input_ids) == length
        assert seq.input_ids[0] == tok.bos_token_id
        facts = {}
        for (template, name, value), at in zip(draw.facts, seq.needles, strict=True):
            line = "\n" + template.needle_text(name, value) + "\n"
            assert tok.decode(seq.input_ids[at:]).startswith(line)  # where it says it is
            facts[name] = value
            used.add(template.name)
        assert len(draw.facts) == {"retrieval": 1, "multikey": 4, "multihop": 4}[task]
        assert len(seq.answers) == {"multikey": 2}.get(task, 1)
        for (a, b), (template, name, value) in zip(seq.answers, draw.asks, strict=True):
            assert tok.decode(seq.input_ids[:a]).endswith(template.question_text(name))
            assert tok.decode(seq.input_ids[a:b]).strip() == value
            while name in facts:  # multihop: follow the chain to the key
                name = facts[name]
            assert name == value and value.isdigit() and len(value) == 5
        if task == "multihop":  # the chain's facts come in chain order
            assert seq.needles == sorted(seq.needles)
            assert len({t.name for t, _, _ in draw.facts}) == 1
        depths += [p / length for p in seq.needles]
    assert used <= train and (task == "multihop" or len(used) >= 3)  # training templates only
    # Facts land over the whole sequence: every fifth of it holds a fair share of them.
    hist = np.histogram(depths, bins=5, range=(0, 1))[0]
    assert hist.min() >= 0.05 * len(depths), hist
    # (The questions take the last tokens: with two prose questions up to ~10% of the length.)
    assert min(depths) < 0.05 and max(depths) > 0.85


def test_a_task_that_cannot_fit_is_refused(bundled_tok_and_filler):
    from ctxext.synthetic import check_task_fits

    tok, _ = bundled_tok_and_filler
    check_task_fits(tok, "multihop", TaskOptions(hops=4), 256)
    with pytest.raises(CtxextError, match=r"multihop task source does not fit .* 256"):
        check_task_fits(tok, "multihop", TaskOptions(hops=40), 256)
    with pytest.raises(CtxextError, match="--task-keys"):
        check_task_fits(tok, "multikey", TaskOptions(keys=40, queries=40), 256)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--mix", "stdlib:1", "--mix", "multihop:1", "--task-hops", "60"],
            "the multihop task source does not fit the training length 512",
        ),
        (["--loss", "longce", "--longce-window", "512"], "not shorter than the training length"),
        (["--mix", "stdlib:1", "--mix", "multikey:-1"], "weights must be finite numbers >= 0"),
    ],
)
def test_refused_in_seconds_before_anything_loads(tmp_path, flags, message):
    """A fresh process, imports included, on the bundled model (trained 256, here 512). Timed
    in CPU seconds of the child (user + system): on a machine shared with other jobs its wall
    time says more about them than about the work done before refusing."""
    cmd = [sys.executable, "-m", "ctxext", "finetune", "-o", str(tmp_path / "o"), "-m", "yarn"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([*cmd, "-f", "2", *flags], capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()
    assert seconds < 3, f"refusal took {seconds:.1f} CPU seconds"


def test_a_mix_of_one_source_trains_exactly_as_that_source(tmp_path, tiny_llama_session):
    plain = run_finetune(str(tiny_llama_session), tmp_path / "a", YARN2, finetune_cfg(steps=3))
    mixed = run_finetune(
        str(tiny_llama_session), tmp_path / "b", YARN2, finetune_cfg(steps=3, mix=["stdlib:1"])
    )
    assert max_weight_diff(model_weights(tmp_path / "a"), model_weights(tmp_path / "b")) == 0
    assert plain["data"]["tokens"] == mixed["data"]["mix"]["sources"][0]["tokens"]


def test_provenance_records_the_mix(tmp_path, tiny_llama_session):
    from ctxext.needles import templates_of

    mix = ["stdlib:0.5", "multikey:0.3", "multihop:0.2"]
    cfg = finetune_cfg(steps=3, batch_size=2, seed=4, mix=mix, tasks={"keys": 3, "hops": 2})
    summary = run_finetune(str(tiny_llama_session), tmp_path / "o", YARN2, cfg)
    prov = json.loads((tmp_path / "o" / "ctxext_provenance.json").read_text())
    assert prov["finetune"]["mix"] == [
        {"source": "stdlib", "weight": 0.5},
        {"source": "multikey", "weight": 0.3},
        {"source": "multihop", "weight": 0.2},
    ]
    assert prov["finetune"]["tasks"] == {"keys": 3, "queries": 2, "hops": 2}
    recorded = prov["training"]["data"]["mix"]
    assert recorded == summary["data"]["mix"] and recorded["seed"] == 4
    assert recorded["filler"] == "stdlib"
    by_name = {s["source"]: s for s in recorded["sources"]}
    assert sum(s["samples"] for s in by_name.values()) == 6  # 3 steps x 2
    assert by_name["stdlib"]["kind"] == "text" and by_name["stdlib"]["fingerprint"]
    assert by_name["multikey"]["task"]["keys"] == 3
    hop = by_name["multihop"]["task"]
    assert (hop["hops"], hop["length"]) == (2, 256)
    assert hop["templates"] == [t.name for t in templates_of("train")]
    # The draws recorded are the draws the seed makes.
    draws = mix_draws([0.5, 0.3, 0.2], seed=4, count=6)
    assert [by_name[n]["samples"] for n in ("stdlib", "multikey", "multihop")] == [
        draws.count(k) for k in range(3)
    ]
