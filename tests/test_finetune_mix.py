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
from ctxext.finetune.loop import run_finetune
from ctxext.finetune.mix import mix_draws

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


@pytest.mark.parametrize("composed", [0.0, 0.5])
@pytest.mark.parametrize("task", ["retrieval", "multikey", "multihop"])
def test_task_sequences_spread_facts_over_the_length_and_answer_right(
    bundled_tok_and_filler, task, composed
):
    from ctxext.evaluate.needles import templates_of
    from ctxext.synthetic import draw_task, needle_ids, task_sequence

    tok, stream = bundled_tok_and_filler
    length, options = 512, TaskOptions(keys=4, queries=2, hops=3, composed=composed)
    train = {t.name for t in templates_of("train")}
    if composed:  # forms drawn from parts (never held out: tests/test_evaluate_composed.py)
        train |= {"composed-code", "composed-prose"}
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
    assert bool(composed) == bool(used & {"composed-code", "composed-prose"})
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
        (
            ["--mix", "stdlib:1", "--mix", "multikey:1", "--task-min-length", "600"],
            "--task-min-length (600) exceeds the training length 512",
        ),
        (
            ["--mix", "stdlib:1", "--mix", "multikey:1", "--task-min-length", "20"],
            "the multikey task source does not fit --task-min-length 20",
        ),
        (["--task-min-length", "64"], "--task-min-length: applies to task sources and none is"),
        (
            [
                "--mix",
                "stdlib:1",
                "--mix",
                "multikey:1",
                "--task-min-length",
                "64",
                "--loss",
                "longce",
            ],
            "task episodes (tasks.min_length) pack several",
        ),
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
    from ctxext.evaluate.needles import templates_of

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


def test_packed_episodes_restart_at_bos_and_span_every_scale(bundled_tok_and_filler):
    from ctxext.synthetic import episode_lengths, packed_episodes

    tok, stream = bundled_tok_and_filler
    length, options = 1024, TaskOptions(keys=2, queries=1, min_length=160)
    sizes = []
    for i in range(40):
        rng = np.random.default_rng([3, i])
        twin = copy.deepcopy(rng)
        filler = stream[i * 50 : i * 50 + length]
        packed = packed_episodes(tok, "multikey", options, filler, length, rng)
        assert packed == packed_episodes(tok, "multikey", options, filler, length, twin)
        assert len(packed.input_ids) == len(packed.labels) == len(packed.position_ids) == length
        start = 0
        for k, ep in enumerate(packed.episodes):
            n = len(ep.input_ids)
            assert n >= 128 and packed.input_ids[start : start + n] == ep.input_ids
            assert packed.input_ids[start] == tok.bos_token_id
            assert packed.position_ids[start : start + n] == list(range(n))
            # No episode's BOS is predicted from the previous episode's last token.
            assert packed.labels[start] == (-100 if k else tok.bos_token_id)
            assert packed.labels[start + 1 : start + n] == ep.input_ids[1:]
            for (a, b), value in zip(ep.answers, ep.values, strict=True):
                assert tok.decode(ep.input_ids[a:b]).strip() == value
            start += n
            sizes.append(n)
        assert start == length
    # Log-uniform from 128 up to 1024: short and long episodes alike.
    assert min(sizes) < 200 and max(sizes) > 700
    assert 0.2 < np.mean(np.array(sizes) < 362) < 0.9  # 362 ~ the geometric midpoint
    assert episode_lengths(200, 128, np.random.default_rng(0)) == [200]  # < 2x min: one


def _episode_model(attn: str):
    import torch
    from transformers import AutoModelForCausalLM

    from ctxext.config import FinetuneConfig
    from ctxext.finetune.model import prepare_model

    model = AutoModelForCausalLM.from_pretrained(
        BUNDLED, dtype=torch.float32, attn_implementation=attn
    )
    return prepare_model(model, FinetuneConfig())[0].eval()


@pytest.mark.parametrize("padding_mask", [False, True], ids=["no-2d-mask", "all-ones-2d-mask"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_no_token_attends_across_episodes(bundled_tok_and_filler, attn, padding_mask):
    """A batch of two packed samples as training builds it (the episode ids turned into the
    block mask, an all-ones 2-D mask folded in where present): every episode's logits are the
    ones it gets alone, with SDPA and with eager attention. The same batch with only the 2-D
    mask lets later episodes read earlier ones (what the block mask exists to prevent)."""
    import torch
    from torch.utils.data import default_collate

    from ctxext.finetune.episodes import EPISODE_KEY, episode_ids, with_episode_mask
    from ctxext.synthetic import packed_episodes

    tok, stream = bundled_tok_and_filler
    model = _episode_model(attn)
    options = TaskOptions(keys=2, queries=1, min_length=64)
    rows, samples = [], []
    for seed in (1, 2):
        rng = np.random.default_rng(seed)
        packed = packed_episodes(tok, "multikey", options, stream[:256], 256, rng)
        assert len(packed.episodes) >= 2
        samples.append(packed)
        row = {
            "input_ids": torch.tensor(packed.input_ids),
            "position_ids": torch.tensor(packed.position_ids),
            EPISODE_KEY: episode_ids([len(ep.input_ids) for ep in packed.episodes]),
        }
        if padding_mask:
            row["attention_mask"] = torch.ones(256, dtype=torch.long)
        rows.append(row)
    batch = default_collate(rows)
    inputs = with_episode_mask(batch, model.config._attn_implementation, torch.float32)
    assert EPISODE_KEY not in inputs and inputs["attention_mask"].dim() == 4
    with torch.no_grad():
        together = model(**inputs).logits
        leaky = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=torch.ones(2, 256, dtype=torch.long),
        ).logits
        worst_leak = 0.0
        for row, packed in enumerate(samples):
            start = 0
            for ep in packed.episodes:
                alone = model(input_ids=torch.tensor([ep.input_ids])).logits[0]
                n = len(ep.input_ids)
                got = together[row, start : start + n]
                assert torch.allclose(got, alone, atol=1e-4), (row, start)
                leak = (leaky[row, start : start + n] - alone).abs().max().item()
                worst_leak = max(worst_leak, leak if start else 0.0)
                start += n
    assert worst_leak > 0.1  # without the block mask the episodes do mix


def test_the_episode_mask_is_block_causal_and_sized_as_planned():
    """The mask's pattern and dtype, its allocation (what `plan` counts), and no mask at all
    for rows of one episode each."""
    import torch

    from ctxext.finetune.episodes import episode_ids, episode_mask, mask_bytes, with_episode_mask

    ids = torch.stack([episode_ids([3, 2, 4]), episode_ids([9])])
    pad = torch.tensor([[1] * 9, [1] * 7 + [0] * 2])
    mask = episode_mask(ids, torch.bfloat16, pad)
    assert mask.shape == (2, 1, 9, 9) and mask.dtype == torch.bfloat16
    allowed = mask[:, 0] == 0
    expect = torch.zeros(2, 9, 9, dtype=torch.bool)
    for a, b in ((0, 3), (3, 5), (5, 9)):
        expect[0, a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
    expect[1] = torch.ones(9, 9, dtype=torch.bool).tril()
    expect[1, :, 7:] = False  # padded keys are seen by no query
    assert torch.equal(allowed, expect)
    assert (mask[:, 0][~expect] == torch.finfo(torch.bfloat16).min).all()
    # Rows aligned for the memory-efficient kernel; what `plan` counts is what is allocated.
    assert mask.stride(-2) % 16 == 0
    assert mask.untyped_storage().nbytes() == mask_bytes(2, 9, 2)
    # Rows of one episode each have nothing to keep apart: plain causal attention (SDPA's
    # fastest kernels), the 2-D mask as given.
    single = {"input_ids": ids, "attention_mask": pad, "episode_ids": torch.zeros_like(ids)}
    out = with_episode_mask(single, "sdpa", torch.float32)
    assert out.keys() == {"input_ids", "attention_mask"} and out["attention_mask"] is pad


def test_training_reads_episodes_through_the_block_mask(tmp_path, tiny_llama_session):
    """The first step's logged loss is the model's loss on sample 0 with the episodes kept
    apart, and not the loss the all-ones mask the samples carry would give on its own."""
    import torch

    from ctxext.finetune.episodes import EPISODE_KEY, with_episode_mask
    from ctxext.finetune.mix import MixedSamples, load_mix
    from ctxext.modeling import load_causal_lm

    mix = ["stdlib:0", "retrieval:1"]
    tasks = {"min_length": 112}
    cfg = finetune_cfg(steps=1, batch_size=1, seed=8, mix=mix, tasks=tasks)
    run_finetune(str(tiny_llama_session), tmp_path / "o", YARN2, cfg)
    logged = json.loads((tmp_path / "o" / "training_log.jsonl").read_text().splitlines()[0])

    loaded = load_causal_lm(str(tiny_llama_session), extend=YARN2, dtype="float32")
    sample = MixedSamples(load_mix(loaded.tokenizer, cfg, 256, 1), start=0, count=1)[0]
    assert int(sample[EPISODE_KEY].max()) >= 1  # several episodes
    batch = {k: v[None] for k, v in sample.items()}
    with torch.no_grad():
        isolated = loaded.model(**with_episode_mask(batch, "sdpa", torch.float32)).loss.item()
        batch.pop(EPISODE_KEY)
        leaky = loaded.model(**batch).loss.item()
    assert logged["loss"] == pytest.approx(isolated, abs=1e-5)
    assert abs(leaky - isolated) > 1e-3


def test_episodes_are_refused_where_no_mask_can_keep_them_apart(tmp_path, monkeypatch):
    """Context parallelism (ring attention without masks) and a sliding window narrower than
    the training length (the 4-D mask would replace it): refused in one line by the setup,
    before torch or any weight loads; attention that takes no 4-D mask: refused at the first
    batch."""
    import torch

    from ctxext.finetune.episodes import with_episode_mask
    from ctxext.finetune.setup import setup_run

    cfg = finetune_cfg(mix=["stdlib:1", "multikey:1"], tasks={"keys": 2, "min_length": 128})
    setup_run(str(BUNDLED), tmp_path / "a", YARN2, cfg, resume=False, overwrite=False)
    monkeypatch.setenv("PARALLELISM_CONFIG_CP_SIZE", "2")
    with pytest.raises(CtxextError, match=r"context parallelism .* runs attention without"):
        setup_run(str(BUNDLED), tmp_path / "a", YARN2, cfg, resume=False, overwrite=False)
    monkeypatch.setenv("PARALLELISM_CONFIG_CP_SIZE", "1")

    windowed = tmp_path / "windowed"
    windowed.mkdir()
    for f in BUNDLED.iterdir():
        (windowed / f.name).symlink_to(f)
    config = json.loads((BUNDLED / "config.json").read_text())
    (windowed / "config.json").unlink()
    (windowed / "config.json").write_text(json.dumps({**config, "sliding_window": 128}))
    with pytest.raises(CtxextError, match=r"sliding window \(128 tokens\) is shorter than .* 512"):
        setup_run(str(windowed), tmp_path / "b", YARN2, cfg, resume=False, overwrite=False)
    plain = finetune_cfg(mix=["stdlib:1", "multikey:1"])  # without episodes: no mask needed
    setup_run(str(windowed), tmp_path / "b", YARN2, plain, resume=False, overwrite=False)

    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "episode_ids": torch.zeros(1, 4)}
    with pytest.raises(CtxextError, match="this model runs flash_attention_2"):
        with_episode_mask(batch, "flash_attention_2", torch.float32)


def test_episode_training_records_its_lengths(tmp_path, tiny_llama_session):
    mix = ["stdlib:0.5", "multikey:0.5"]
    tasks = {"keys": 2, "queries": 1, "min_length": 160}
    cfg = finetune_cfg(steps=2, batch_size=2, seed=1, mix=mix, tasks=tasks)
    summary = run_finetune(str(tiny_llama_session), tmp_path / "o", YARN2, cfg)
    prov = json.loads((tmp_path / "o" / "ctxext_provenance.json").read_text())
    assert prov["finetune"]["tasks"]["min_length"] == 160
    (task,) = [s for s in summary["data"]["mix"]["sources"] if s["kind"] == "task"]
    assert task["task"]["lengths"].startswith("episodes of log-uniform length 160..256")
    assert task["samples"] > 0 and np.isfinite(summary["final_loss"])


def test_composed_share_is_a_probability_recorded_only_when_set():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="probability"):
        TaskOptions(composed=1.5)
    # Unset, it is not recorded: the runs and provenance written before it existed stay equal.
    assert "composed" not in TaskOptions().model_dump()
    assert TaskOptions(composed=0.5).model_dump()["composed"] == 0.5
