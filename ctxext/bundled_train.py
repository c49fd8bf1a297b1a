"""Train the bundled model: a small Llama trained at 256 tokens on the stdlib corpus.

Regenerate it with ``python -m ctxext.bundled_train --out ctxext/bundled/stdlib-llama``.
Everything is deterministic from the seed on one machine (tokenizer training, data order,
initialisation, dropout-free training in fp32 on CPU with a fixed thread count).

Why these choices: the model should behave like a real RoPE checkpoint scaled down:
Llama architecture, GQA, rope_theta 10000 (Llama 2), tied embeddings (Llama 3.2 1B/3B), a BPE
tokenizer with BOS/EOS, weights stored in float16 as Llama 2 ships them. Trained at 256 tokens,
with rope_theta 10000 and head_dim 64, about 60% of its frequency pairs never complete a full
turn within the training length, the regime in which position interpolation and YaRN matter.

The training mix (the defaults): 40% packed stdlib code, 30% retrieval sequences (1 to 4
key/value lines hidden in code, each asked for at the end, see retrieval_chunks; each line in a
form of the *training* grid of ``ctxext.evaluate.needles`` or, half the time, in a form composed
from parts by ``ctxext.evaluate.composed``; the held-out forms are never trained on)
and 30% copy sequences (128 random corpus tokens repeated, see copy_chunks), all at 256 tokens.
The synthetic 60% make the model able to retrieve a value from anywhere in its trained window,
so that retrieval past 256 tokens measures the extension method rather than a model that never
learned to look back; without the copy sequences it did not learn that within this budget, and
with code alone it never did. The composed forms make the skill carry to syntax it never saw:
trained on the 288-form grid alone, the model retrieved 75% in training forms but 2-18% per
held-out family; with the composed forms, 50-63% (docs/bundled-model.md).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable
from functools import partial
from pathlib import Path

from ctxext.finetune.data import pack_documents
from ctxext.finetune.optim import adamw, schedule_factor

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
TRAIN_LENGTH = 256


def train_tokenizer(texts: Iterable[str], vocab_size: int):  # -> PreTrainedTokenizerFast
    """A byte-level BPE tokenizer (GPT-2/Llama-3 style) with Llama-3-like special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=TRAIN_LENGTH,
        add_bos_token=False,
    )


def model_config(
    vocab_size: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    rope_theta: float = 10000.0,
    arch: dict | None = None,
):  # -> LlamaConfig
    """The bundled model's LlamaConfig; ``arch`` overrides its fields (``--arch`` experiments)."""
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=vocab_size,
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=TRAIN_LENGTH,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        attention_dropout=0.0,
        initializer_range=0.02,
    )
    fields.update(arch or {})
    return LlamaConfig(**fields)


def packed_stream(tokenizer, texts: Iterable[str]) -> list[int]:
    """BOS + tokens + EOS for every document, concatenated (the usual pre-training packing,
    the same as `ctxext finetune`'s)."""
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    return pack_documents(ids, tokenizer.bos_token_id, tokenizer.eos_token_id)


def training_chunks(stream: list[int], bos_id: int, bos_per_chunk: bool):  # -> LongTensor
    """[n, TRAIN_LENGTH] training sequences from the packed stream (see packed_stream).

    Default: the packed stream cut into consecutive pieces, so sequences start anywhere in a
    document. With ``bos_per_chunk`` every sequence starts with BOS at position 0 and documents
    are separated by EOS only (as when a data loader prepends BOS to each sequence): the model
    then only ever sees its first token at distances < TRAIN_LENGTH.
    """
    import torch

    tokens = torch.tensor(stream, dtype=torch.long)
    if not bos_per_chunk:
        n = len(tokens) // TRAIN_LENGTH
        return tokens[: n * TRAIN_LENGTH].view(n, TRAIN_LENGTH)
    body = tokens[tokens != bos_id]
    n = len(body) // (TRAIN_LENGTH - 1)
    pieces = body[: n * (TRAIN_LENGTH - 1)].view(n, TRAIN_LENGTH - 1)
    return torch.cat([torch.full((n, 1), bos_id), pieces], dim=1)


def retrieval_prompts(tokenizer, stream: list[int], n: int, seed: int, split: str) -> list:
    """``n`` one-needle retrieval prompts at TRAIN_LENGTH from ``stream``, cycling through the
    templates of ``split`` (``ctxext.evaluate.needles``), placed and scored as ``ctxext eval`` does."""
    import numpy as np

    from ctxext.evaluate.needles import build_prompt, random_key, random_name, templates_of

    forms = templates_of(split)
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(n):
        t = forms[i % len(forms)]
        start = int(rng.integers(0, len(stream) - TRAIN_LENGTH))
        key = random_key(rng)
        name = random_name(rng, t.shape)
        window = stream[start : start + TRAIN_LENGTH]
        prompts.append(build_prompt(tokenizer, window, TRAIN_LENGTH, rng.random(), key, name, t))
    return prompts


def retrieval_probe(model, prompts: list) -> float:
    """Teacher-forced retrieval accuracy on ``prompts``, scored as ``ctxext eval`` scores it."""
    import torch

    from ctxext.evaluate.scoring import answer_correct

    was_training = model.training
    model.eval()
    with torch.no_grad():
        hits = sum(answer_correct(model, p) for p in prompts)
    model.train(was_training)
    return hits / len(prompts)


def retrieval_chunks(
    tokenizer, stream: list[int], n: int, seed: int, needles: int = 1, composed: float = 0.0
):  # -> LongTensor
    """[n, TRAIN_LENGTH] synthetic retrieval sequences for the ``--retrieval-mix``.

    Each is a random window of the packed training stream with 1 to ``needles`` key/value
    lines in the *training* templates of ``ctxext.evaluate.needles`` (a random form per needle) at
    uniform random depths (on line boundaries), each asked for at the end
    (``needles.multi_needle_ids``). Trained on with the ordinary next-token loss, so the model
    learns to find a name and copy the value it saw with it (at distances < TRAIN_LENGTH only,
    like everything else it sees). The held-out templates never appear: ``ctxext eval``
    scores them, so retrieval measures the skill, not a memorised form.

    With ``composed`` > 0, each needle is in a form drawn from parts
    (``ctxext.evaluate.composed``) with that probability, else in a grid form: so many syntaxes
    that the model cannot memorise them and has to learn to match the name.
    """
    import numpy as np
    import torch

    from ctxext.evaluate.composed import composed_form
    from ctxext.evaluate.needles import multi_needle_ids, templates_of

    grid = templates_of("train")
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        start = int(rng.integers(0, len(stream) - TRAIN_LENGTH))
        window = stream[start : start + TRAIN_LENGTH]
        forms = grid
        if composed > 0:  # one candidate per needle slot, each composed with that probability
            forms = [
                composed_form(rng)
                if rng.random() < composed
                else grid[int(rng.integers(len(grid)))]
                for _ in range(needles)
            ]
        rows.append(multi_needle_ids(tokenizer, window, TRAIN_LENGTH, rng, needles, forms))
    return torch.tensor(rows, dtype=torch.long).view(n, TRAIN_LENGTH)


def copy_chunks(stream: list[int], n: int, seed: int):  # -> LongTensor
    """[n, TRAIN_LENGTH] sequences of 128 tokens and the same 128 tokens again (no BOS).

    The tokens are drawn independently from the corpus (its unigram distribution), so the
    second half is predictable only by looking back 128 tokens and copying: the cheapest data
    that makes a small model form induction heads (Olsson et al. 2022), the circuit key-value
    retrieval builds on. Without it the model never learned to copy a value within this
    training budget (6M tokens), and copies of real code did not teach it either (the model
    can predict code without looking back). No BOS: a model that often saw noise after a
    BOS at position 0 reads every real document that starts with one badly (measured: held-out
    perplexity 87 on the files' first 256 tokens after BOS, 21 on the same text packed without
    a BOS at position 0).
    """
    import numpy as np
    import torch

    rng = np.random.default_rng(seed + 2)
    half = TRAIN_LENGTH // 2
    rows = []
    for _ in range(n):
        piece = [stream[i] for i in rng.integers(0, len(stream), half)]
        rows.append([*piece, *piece])
    return torch.tensor(rows, dtype=torch.long).view(n, TRAIN_LENGTH)


def train(
    out: Path,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    vocab_size: int,
    bos_per_chunk: bool = False,
    rope_theta: float = 10000.0,
    arch: dict | None = None,
    weight_decay: float = 0.1,
    retrieval_mix: float = 0.0,
    retrieval_needles: int = 1,
    probe_every: int = 100,
    copy_mix: float = 0.0,
    composed: float = 0.0,
) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    from ctxext.corpus import stdlib_documents

    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    texts = [d.text for d in stdlib_documents("train")]
    tokenizer = train_tokenizer(texts, vocab_size)
    stream = packed_stream(tokenizer, texts)
    chunks = training_chunks(stream, tokenizer.bos_token_id, bos_per_chunk)
    n_text = len(chunks)
    # Fractions `retrieval_mix` and `copy_mix` of all sequences are synthetic: retrieval prompts
    # (see retrieval_chunks) and copies (see copy_chunks); the rest is the packed corpus.
    synthetic = retrieval_mix + copy_mix
    n_retrieval = round(n_text * retrieval_mix / (1 - synthetic))
    n_copy = round(n_text * copy_mix / (1 - synthetic))
    if n_retrieval:
        chunks = torch.cat(
            [
                chunks,
                retrieval_chunks(tokenizer, stream, n_retrieval, seed, retrieval_needles, composed),
            ]
        )
    if n_copy:
        chunks = torch.cat([chunks, copy_chunks(stream, n_copy, seed)])
    n_chunks = len(chunks)
    # Two probes of 60 retrieval prompts hidden in held-out code, logged with the loss: one in
    # the training templates, one in the held-out templates (never trained on).
    held_out = packed_stream(tokenizer, [d.text for d in stdlib_documents("heldout")])
    probes = {
        split: retrieval_prompts(tokenizer, held_out, 60, seed + 1, split)
        for split in ("train", "heldout")
    }
    print(
        f"train tokens {len(stream):,} -> {n_text:,} chunks of {TRAIN_LENGTH}"
        f" + {n_retrieval:,} retrieval + {n_copy:,} copy chunks",
        flush=True,
    )

    config = model_config(
        len(tokenizer),
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        rope_theta=rope_theta,
        arch=arch,
    )
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).float()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters {n_params:,}", flush=True)

    # AdamW with decay on matrices only; linear warm-up, then cosine decay to 10% of the peak:
    # the usual LLM recipe, and the same code as `ctxext finetune --lr-schedule cosine`.
    opt = adamw(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    warmup = max(1, steps // 50)
    schedule = partial(schedule_factor, warmup=warmup, steps=steps, schedule="cosine")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_chunks, generator=gen)
    pos, t0, log = 0, time.time(), []
    model.train()
    for step in range(steps):
        if pos + batch_size > n_chunks:  # a new epoch: a new permutation from the same generator
            order, pos = torch.randperm(n_chunks, generator=gen), 0
        batch = chunks[order[pos : pos + batch_size]]
        pos += batch_size
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        probe_now = step % probe_every == 0 or step == steps - 1
        if step % 50 == 0 or probe_now:
            elapsed = time.time() - t0
            tps = (step + 1) * batch_size * TRAIN_LENGTH / elapsed
            entry = {"step": step, "loss": round(loss.item(), 4), "tokens_per_s": round(tps)}
            if probe_now:
                for split, probe in probes.items():
                    entry[f"retrieval_probe_{split}"] = retrieval_probe(model, probe)
            log.append(entry)
            print(
                f"step {step:5d} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"retrieval train {entry.get('retrieval_probe_train', float('nan')):.2f} "
                f"held-out {entry.get('retrieval_probe_heldout', float('nan')):.2f} "
                f"{tps:,.0f} tok/s elapsed {elapsed / 60:.1f} min",
                flush=True,
            )

    out.mkdir(parents=True, exist_ok=True)
    model.config.dtype = torch.float16
    model.to(torch.float16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    summary = {
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "train_length": TRAIN_LENGTH,
        "lr": lr,
        "parameters": n_params,
        "train_tokens_seen": steps * batch_size * TRAIN_LENGTH,
        "train_corpus_tokens": len(stream),
        "bos_per_chunk": bos_per_chunk,
        "rope_theta": rope_theta,
        "arch": arch or {},
        "weight_decay": weight_decay,
        "retrieval_mix": retrieval_mix,
        "retrieval_needles": retrieval_needles,
        "copy_mix": copy_mix,
        "composed": composed,
        "minutes": round((time.time() - t0) / 60, 1),
        "torch": torch.__version__,
        "log": log,
    }
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("ctxext/bundled/stdlib-llama"))
    ap.add_argument("--steps", type=int, default=4500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rope-theta", type=float, default=10000.0, help="10000: Llama 2's")
    ap.add_argument(
        "--bos-per-chunk", action="store_true", help="start every training sequence with BOS"
    )
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument(
        "--retrieval-mix",
        type=float,
        default=0.3,
        help="fraction of training sequences that are code retrieval prompts (0 <= f < 1)",
    )
    ap.add_argument(
        "--retrieval-needles",
        type=int,
        default=4,
        help="key/value pairs per retrieval sequence (each asked for at the end)",
    )
    ap.add_argument(
        "--copy-mix",
        type=float,
        default=0.3,
        help="fraction of training sequences that repeat their first half (induction data)",
    )
    ap.add_argument(
        "--composed",
        type=float,
        default=0.5,
        help="probability that a retrieval needle's form is drawn from parts "
        "(ctxext.evaluate.composed) rather than taken from the training grid",
    )
    ap.add_argument("--probe-every", type=int, default=100, help="steps between retrieval probes")
    ap.add_argument(
        "--arch",
        action="append",
        default=[],
        metavar="KEY=INT",
        help="override a LlamaConfig size field, e.g. --arch hidden_size=192 (repeatable)",
    )
    args = ap.parse_args()
    if not (
        args.retrieval_mix >= 0.0
        and args.copy_mix >= 0.0
        and args.retrieval_mix + args.copy_mix < 1.0
    ):
        ap.error("--retrieval-mix and --copy-mix must be >= 0 with a sum below 1")
    # Checked here, before the tokenizer and the data are built (a minute of work).
    if not 0.0 <= args.composed <= 1.0:
        ap.error("--composed is a probability: use a value in [0, 1]")
    if args.retrieval_needles < 1 or args.probe_every < 1:
        ap.error("--retrieval-needles and --probe-every must be at least 1")
    arch = {k: int(v) for k, v in (item.split("=", 1) for item in args.arch)}
    import torch

    torch.set_num_threads(args.threads)
    train(
        args.out,
        args.steps,
        args.batch_size,
        args.lr,
        args.seed,
        args.vocab_size,
        bos_per_chunk=args.bos_per_chunk,
        rope_theta=args.rope_theta,
        arch=arch,
        weight_decay=args.weight_decay,
        retrieval_mix=args.retrieval_mix,
        retrieval_needles=args.retrieval_needles,
        probe_every=args.probe_every,
        copy_mix=args.copy_mix,
        composed=args.composed,
    )


if __name__ == "__main__":
    main()
