"""Diagnostic: does a model have an attention sink, and where does its attention go past 256?

Real RoPE checkpoints (Llama 2, Mistral, ...) put most of their attention on the first token (an
"attention sink") in all but the first layers, and break down past their trained length when
unseen distances disturb that pattern. This prints, per layer, on 1024-token windows of held-out
stdlib files (BOS + the first 1023 tokens; eager attention, fp32, averaged over heads):

- the attention on token 0 from queries at 64-255 (inside the trained length) and at 768-1023;
- the attention mass that queries at 768-1023 put on keys more than 256 tokens back.

    python benchmarks/attention_sink.py [MODEL] [--docs 8]
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ctxext.data import load_documents, tokenize_documents
from ctxext.locate import resolve_model

WINDOW = 1024


def windows(tokenizer, n_docs: int) -> torch.Tensor:
    """BOS + the first WINDOW-1 tokens of the first ``n_docs`` held-out files that long."""
    token_ids = tokenize_documents(tokenizer, load_documents(None))  # eval's default data
    rows = [
        [tokenizer.bos_token_id, *ids[: WINDOW - 1]] for ids in token_ids if len(ids) >= WINDOW - 1
    ]
    return torch.tensor(rows[:n_docs], dtype=torch.long)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="stdlib-llama")
    ap.add_argument("--docs", type=int, default=8)
    args = ap.parse_args()
    path = resolve_model(args.model).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    x = windows(tokenizer, args.docs)
    with torch.no_grad():
        attentions = model(x, output_attentions=True).attentions  # per layer [b, h, q, k]
    q = torch.arange(WINDOW)[:, None]
    k = torch.arange(WINDOW)[None, :]
    far = (q - k) > 256  # keys at distances the model never saw in training
    print(f"{args.model}: {len(x)} windows of {WINDOW} tokens\n")
    print("| layer | on token 0, queries 64-255 | on token 0, queries 768-1023 |", end="")
    print(" on keys > 256 back, queries 768-1023 |")
    print("|---:|---:|---:|---:|")
    for layer, a in enumerate(attentions):
        early = a[:, :, 64:256, 0].mean().item()
        late = a[:, :, 768:, 0].mean().item()
        mass = (a[:, :, 768:, :] * far[768:]).sum(-1).mean().item()
        print(f"| {layer} | {early:.3f} | {late:.3f} | {mass:.3f} |")


if __name__ == "__main__":
    main()
