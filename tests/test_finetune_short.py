"""Mixed context-window training (ctxext/finetune/short.py): short batches of episodes no
longer than the trained length, so a --keep-short model trains its short mode too."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from conftest import BUNDLED, finetune_cfg
from pydantic import ValidationError

from ctxext.config import ExtendConfig, FinetuneConfig, TaskOptions
from ctxext.errors import CtxextError
from ctxext.finetune.episodes import EPISODE_KEY
from ctxext.finetune.loop import run_finetune
from ctxext.finetune.short import ShortBatches, short_task_sample, short_text_sample

# The tiny Llama is trained at 128 tokens; its short mode is exactly the unscaled model.
KEEP_SHORT = ExtendConfig(method="yarn", factor=2, keep_short=True, attention_factor=1.0)


def test_short_batches_are_drawn_per_batch_from_seed_and_batch_number():
    short = ShortBatches(fraction=0.3, length=128, batch_size=4, seed=5)
    flags = [short.is_short(i) for i in range(8000)]
    batches = [flags[i : i + 4] for i in range(0, 8000, 4)]
    assert all(len(set(b)) == 1 for b in batches)  # one mode per forward pass
    assert 0.25 < np.mean([b[0] for b in batches]) < 0.35
    again = ShortBatches(fraction=0.3, length=128, batch_size=4, seed=5)
    assert [again.is_short(i) for i in range(8000)] == flags  # a resumed run draws the same
    other = ShortBatches(fraction=0.3, length=128, batch_size=4, seed=6)
    assert [other.is_short(i) for i in range(8000)] != flags
    assert not any(ShortBatches(0.0, 128, 4, 5).is_short(i) for i in range(100))


def test_a_short_text_sample_keeps_the_text_and_no_position_reaches_the_trained_length():
    import torch

    chunk = torch.arange(1000, 1600)
    out = short_text_sample(chunk, 256)
    assert torch.equal(out["input_ids"], chunk) and torch.equal(out["labels"], chunk)
    assert int(out["position_ids"].max()) == 255
    assert out["position_ids"][256] == 0 and out["position_ids"][512] == 0
    assert out[EPISODE_KEY].tolist() == [0] * 256 + [1] * 256 + [2] * 88


@pytest.fixture(scope="module")
def tok_and_filler():
    from ctxext.bundled_train import packed_stream
    from ctxext.corpus import stdlib_documents
    from ctxext.modeling import load_tokenizer

    tok = load_tokenizer(BUNDLED)
    docs = [d.text for d in itertools.islice(stdlib_documents("train"), 40)]
    return tok, packed_stream(tok, docs)


@pytest.mark.parametrize("min_length", [None, 64, 1024])
def test_a_short_task_sample_packs_episodes_of_at_most_the_trained_length(
    tok_and_filler, min_length
):
    """2048 tokens of multi-key episodes, each starting at BOS with position 0 and none longer
    than 256; every episode's questions are answered with its own keys; no target is
    predicted across an episode boundary."""
    tok, stream = tok_and_filler
    options = TaskOptions(keys=2, queries=1, min_length=min_length)
    rng = np.random.default_rng(3)
    out = short_task_sample(tok, "multikey", options, stream[:2048], 2048, 256, rng)
    ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    positions, episodes = out["position_ids"].tolist(), out[EPISODE_KEY].tolist()
    assert len(ids) == len(labels) == len(positions) == len(episodes) == 2048
    sizes = [len(list(g)) for _, g in itertools.groupby(episodes)]
    assert max(sizes) <= 256 and len(sizes) >= 8
    if min_length == 64:
        assert min(sizes) < 128  # log-uniform from 64: shorter episodes too
    start = 0
    for n in sizes:
        assert positions[start : start + n] == list(range(n))
        assert ids[start] == tok.bos_token_id
        if start:
            assert labels[start] == -100
        start += n


def test_short_batches_train_the_unscaled_mode_of_a_keep_short_model(tmp_path, tiny_llama_session):
    """The first step's logged loss is the *unscaled* model's loss on sample 0 (a short batch
    of isolated episodes): the short batch ran in the short mode, which --keep-short with
    attention factor 1 makes the trained model itself. The same sample as a long row (the
    rescaled mode) gives another loss."""
    import torch
    from transformers import AutoModelForCausalLM

    from ctxext.finetune.episodes import with_episode_mask
    from ctxext.finetune.mix import MixedSamples, load_mix
    from ctxext.modeling import load_tokenizer

    mix = ["stdlib:1", "retrieval:1"]
    cfg = finetune_cfg(steps=2, batch_size=1, seed=0, short_fraction=0.5, mix=mix)
    short = ShortBatches(0.5, 128, 1, cfg.seed)
    assert short.is_short(0) and not short.is_short(1)  # seed 0: step 1 short, step 2 long
    run_finetune(str(tiny_llama_session), tmp_path / "o", KEEP_SHORT, cfg)
    log = [json.loads(x) for x in (tmp_path / "o" / "training_log.jsonl").read_text().splitlines()]

    tok = load_tokenizer(tiny_llama_session)
    samples = MixedSamples(load_mix(tok, cfg, 256, 2), start=0, count=2, short=short)
    sample = samples[0]
    assert int(sample["position_ids"].max()) == 127 and int(sample[EPISODE_KEY].max()) >= 1
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_session), dtype=torch.float32)
    base.eval()
    batch = with_episode_mask({k: v[None] for k, v in sample.items()}, "sdpa", torch.float32)
    with torch.no_grad():
        unscaled = base(**batch).loss.item()
        as_long = base(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item()
    assert log[0]["loss"] == pytest.approx(unscaled, abs=1e-5)
    assert abs(as_long - unscaled) > 1e-3
    assert int(samples[1]["input_ids"].shape[0]) == 256 and "position_ids" not in samples[1]


def test_short_fraction_is_refused_where_it_cannot_hold(tmp_path, tiny_llama_session):
    with pytest.raises(ValidationError, match="short_fraction"):
        FinetuneConfig(short_fraction=0.5, pose=True, train_length=128)
    with pytest.raises(ValidationError, match="short_fraction"):
        FinetuneConfig(short_fraction=0.5, loss="longce")
    with pytest.raises(ValidationError, match="rescaled mode is never trained"):
        FinetuneConfig(short_fraction=1.0)
    cfg = finetune_cfg(short_fraction=0.5, train_length=128)
    with pytest.raises(CtxextError, match="not longer"):
        run_finetune(str(tiny_llama_session), tmp_path / "o", KEEP_SHORT, cfg)
    assert not (tmp_path / "o").exists()
    # Recorded only when set: a run of an older version still resumes.
    assert "short_fraction" not in FinetuneConfig().identity()
    assert FinetuneConfig(short_fraction=0.25).identity()["short_fraction"] == 0.25


def test_a_run_without_a_mix_packs_its_short_batches_too():
    """The single-source path (PackedSamples): short batches are the same chunks cut into
    episodes, the others the chunks as they are."""
    import torch

    from ctxext.finetune.data import PackedSamples

    chunks = torch.arange(8 * 512).reshape(8, 512)
    short = ShortBatches(0.5, 128, 2, seed=0)
    samples = PackedSamples(chunks, start=0, count=8, seed=0, short=short)
    plain = PackedSamples(chunks, start=0, count=8, seed=0)
    kinds = []
    for i in range(8):
        got, want = samples[i], plain[i]
        assert torch.equal(got["input_ids"], want["input_ids"])  # same chunk, same order
        if short.is_short(i):
            assert int(got["position_ids"].max()) == 127 and int(got[EPISODE_KEY].max()) == 3
        else:
            assert got.keys() == {"input_ids", "labels"}
        kinds.append(short.is_short(i))
    assert True in kinds and False in kinds
