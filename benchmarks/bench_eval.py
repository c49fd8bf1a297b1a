"""Benchmark: `model(input_ids, labels=input_ids)` vs ctxext's chunked `token_nll`.

A small Llama (the first bundled model's shape: hidden 256, intermediate 768, 4 layers, 4 heads,
2 KV heads, head_dim 64, rope_theta 10000, tied embeddings) scaled to a 32k vocabulary, random
weights, fp32, SDPA attention. Every (approach, length) runs in a fresh subprocess so its peak
RSS (ru_maxrss) is its own; each child does one warm-up pass and then ``--repeats`` timed passes
(median tokens/s). A third child runs only the decoder (final hidden states, no LM head, no
loss): the floor under any head/loss strategy, which shows what dominates when ours is not far
below the straightforward approach.

    python benchmarks/bench_eval.py --lengths 1024 2048 4096 8192 16384 --repeats 3 --out bench.md

Targets (issue): at 16k, ours peak RSS <= 40% of the straightforward approach's, tokens/s
>= 0.9x, perplexities equal within 1e-4 relative.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

VOCAB = 32_000
MODES = ("naive", "ours", "decoder")


def build_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def child(mode: str, length: int, repeats: int, warmup: int, threads: int | None) -> None:
    """Measure one approach at one length; prints one JSON line."""
    import resource

    import psutil
    import torch

    from ctxext.evaluate import token_nll

    if threads:
        torch.set_num_threads(threads)
    model = build_model()
    ids = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(1))

    def run() -> float | None:
        with torch.inference_mode():
            if mode == "naive":
                return model(input_ids=ids, labels=ids).loss.double().item()
            if mode == "ours":
                return token_nll(model, ids).double().mean().item()
            model.model(input_ids=ids, use_cache=False)  # decoder only: no loss
            return None

    base_rss = psutil.Process().memory_info().rss
    times, mean_nll = [], None
    for i in range(warmup + repeats):
        t = time.perf_counter()
        mean_nll = run()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(
        json.dumps(
            {
                "mode": mode,
                "length": length,
                "threads": torch.get_num_threads(),
                "base_rss_mb": base_rss / 2**20,
                "peak_rss_mb": peak / 2**20,
                "tok_s": length / statistics.median(times),
                "times": times,
                "mean_nll": mean_nll,
            }
        )
    )


def measure(mode: str, length: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--lengths", str(length)]
    cmd += ["--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def table(rows: list[dict[str, dict]]) -> str:
    lines = [
        "| length | peak RSS naive (MB) | peak RSS ours (MB) | ours/naive | tok/s naive "
        "| tok/s ours | ours/naive | ppl rel diff | peak RSS decoder only (MB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        n, o, d = r["naive"], r["ours"], r["decoder"]
        # exp(a) / exp(b) - 1 from the mean NLLs, exact even when the ppl is huge
        rel = abs(math.expm1(o["mean_nll"] - n["mean_nll"]))
        lines.append(
            f"| {n['length']} | {n['peak_rss_mb']:.0f} | {o['peak_rss_mb']:.0f} "
            f"| {o['peak_rss_mb'] / n['peak_rss_mb']:.2f} | {n['tok_s']:.0f} | {o['tok_s']:.0f} "
            f"| {o['tok_s'] / n['tok_s']:.2f} | {rel:.1e} | {d['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per child (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed passes first")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    ap.add_argument("--out", type=Path, help="also write the Markdown table here")
    ap.add_argument("--json", type=Path, help="also write every raw measurement here")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.lengths[0], args.repeats, args.warmup, args.threads)
        return
    rows = []
    for length in args.lengths:
        rows.append({mode: measure(mode, length, args) for mode in MODES})
        print(f"measured length {length}", file=sys.stderr, flush=True)
    base = rows[0]["naive"]["base_rss_mb"]
    text = (
        f"{table(rows)}\n\nvocab {VOCAB}, fp32, SDPA, {rows[0]['naive']['threads']} threads, "
        f"median of {args.repeats} timed passes after {args.warmup} warm-up; RSS before the "
        f"first forward pass (imports + model) is about {base:.0f} MB in every child."
    )
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps({"when": time.time(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
