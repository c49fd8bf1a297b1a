"""The bundled model's training data layout (ctxext/bundled_train.py)."""

from __future__ import annotations

import pytest

from ctxext.bundled_train import TRAIN_LENGTH, packed_stream, training_chunks


@pytest.fixture(scope="module")
def tok_and_texts(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from ctxext.corpus import stdlib_documents

    texts = [d.text for _, d in zip(range(8), stdlib_documents("train"), strict=False)]
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir), texts


def test_default_chunks_are_consecutive_pieces_of_the_packed_stream(tok_and_texts):
    tok, texts = tok_and_texts
    stream = packed_stream(tok, texts)
    chunks = training_chunks(stream, tok.bos_token_id, bos_per_chunk=False)
    assert chunks.shape == (len(stream) // TRAIN_LENGTH, TRAIN_LENGTH)
    assert len(chunks) >= 4
    assert chunks.flatten().tolist() == stream[: chunks.numel()]
    # Sequences start anywhere: most do not start with BOS.
    assert (chunks[:, 0] != tok.bos_token_id).float().mean() > 0.5


def test_bos_per_chunk_starts_every_sequence_with_bos_and_keeps_eos_separators(tok_and_texts):
    tok, texts = tok_and_texts
    stream = packed_stream(tok, texts)
    chunks = training_chunks(stream, tok.bos_token_id, bos_per_chunk=True)
    body = [t for t in stream if t != tok.bos_token_id]
    assert chunks.shape == (len(body) // (TRAIN_LENGTH - 1), TRAIN_LENGTH)
    assert (chunks[:, 0] == tok.bos_token_id).all()
    assert (chunks[:, 1:] != tok.bos_token_id).all()
    assert chunks[:, 1:].flatten().tolist() == body[: chunks[:, 1:].numel()]
    assert (chunks == tok.eos_token_id).sum() == body[: chunks[:, 1:].numel()].count(
        tok.eos_token_id
    )


def test_model_config_matches_the_shipped_model_and_takes_overrides():
    from ctxext.bundled_train import model_config
    from ctxext.checkpoint import read_config
    from ctxext.locate import bundled_path

    shipped = read_config(bundled_path())
    cfg = model_config(
        shipped["vocab_size"], 0, 1, 2, rope_theta=shipped["rope_parameters"]["rope_theta"]
    )
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(cfg, key) == shipped[key]
    small = model_config(4096, 0, 1, 2, arch={"hidden_size": 192, "num_attention_heads": 3})
    assert (small.hidden_size, small.num_attention_heads, small.vocab_size) == (192, 3, 4096)
    assert small.head_dim == 64 and small.max_position_embeddings == TRAIN_LENGTH


def test_retrieval_chunks_are_seeded_training_form_prompts(tok_and_texts):
    """Seeded, BOS-led, 1 to 3 needles (4 of the longest prose forms overflow 256 tokens of this
    small tokenizer), random keys; each needle asked for at the end in its
    own training form (the full check of every form is tests/test_evaluate_needles.py)."""
    import re

    from ctxext.bundled_train import retrieval_chunks

    tok, texts = tok_and_texts
    stream = packed_stream(tok, texts)
    chunks = retrieval_chunks(tok, stream, 40, seed=3, needles=3)
    assert chunks.shape == (40, TRAIN_LENGTH)
    assert (chunks[:, 0] == tok.bos_token_id).all()
    assert chunks.tolist() == retrieval_chunks(tok, stream, 40, seed=3, needles=3).tolist()
    texts = [tok.decode(row) for row in chunks.tolist()]
    keys = {k for text in texts for k in re.findall(r"(?<![\d#])(\d{5})(?=\n|$)", text)}
    assert len(keys) > 20  # random keys, not one memorisable constant
    # The held-out prose form's words never appear (the form-level checks: test_evaluate_needles.py).
    assert not any("Remember: the code for" in text for text in texts)
    prose = (
        "# The value of",
        "# Note that",
        "has the number",
        "is stored as",
        "# We gave",
        "holds",
    )
    assert sum(any(p in text for p in prose) for text in texts) > 2  # prose forms are in the mix


def test_copy_chunks_repeat_their_first_half_without_bos(tok_and_texts):
    from ctxext.bundled_train import copy_chunks

    tok, texts = tok_and_texts
    stream = packed_stream(tok, texts)
    chunks = copy_chunks(stream, 5, seed=0)
    half = TRAIN_LENGTH // 2
    assert chunks.shape == (5, TRAIN_LENGTH)
    assert (chunks[:, :half] == chunks[:, half:]).all()
    assert (chunks[:, 0] != tok.bos_token_id).any()  # no BOS at position 0 by construction
    # Tokens drawn independently from the corpus: the first half is not a window of it.
    first = chunks[0, :half].tolist()
    windows = {tuple(stream[i : i + 8]) for i in range(len(stream) - 8)}
    assert tuple(first[:8]) not in windows


@pytest.mark.parametrize(
    "flags", [["--retrieval-needles", "0"], ["--probe-every", "0"], ["--copy-mix", "0.8"]]
)
def test_bad_mix_flags_are_refused_before_any_work(flags):
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "ctxext.bundled_train", "--out", "unused", *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "must be" in res.stderr.splitlines()[-1]
    assert "train tokens" not in res.stdout  # refused before the data is built
