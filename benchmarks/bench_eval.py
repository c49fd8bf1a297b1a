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

``--sweep`` measures a length sweep instead (issue 14): the bundled model, base + linear, ntk,
yarn, dynamic (each x8, to 2048), every held-out file of at least 2048 tokens (the same
documents at every length), evaluated three ways on the same loaded model: the sweep
256/512/1024/2048 in one pass per document (ctxext's default), the same sweep with separate
passes per length, and 2048 alone. Only evaluation is timed, in CPU seconds of the process
(model loading is not):

    python benchmarks/bench_eval.py --sweep --threads 1 --repeats 3 --out bench_sweep.md

Target: the sweep takes <= 1.1x the 2048-only run, with the same numbers.
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

    from ctxext.evaluate.loss import token_nll

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


SWEEP = [256, 512, 1024, 2048]
SWEEP_METHODS = (None, "linear", "ntk", "yarn", "dynamic")


def _max_rel_diff(a: dict, b: dict) -> float:
    """Largest relative difference of perplexity over lengths and position buckets."""
    diffs = []
    for n, x in a.items():
        y = b[n]
        diffs.append(abs(math.expm1((x.nll_sum - y.nll_sum) / x.n_tokens)))
        for bx, by in zip(x.buckets, y.buckets, strict=True):
            if bx["n_tokens"]:
                diffs.append(abs(math.expm1((bx["nll_sum"] - by["nll_sum"]) / bx["n_tokens"])))
    return max(diffs)


def sweep(threads: int | None, repeats: int, num_docs: int | None) -> tuple[str, list[dict]]:
    """One-pass sweep vs per-length sweep vs the longest length alone, per method."""
    import torch

    from ctxext.config import ExtendConfig
    from ctxext.data import load_documents
    from ctxext.evaluate.perplexity import evaluate_lengths
    from ctxext.evaluate.protocol import tokenize_for_eval
    from ctxext.locate import resolve_model
    from ctxext.modeling import load_causal_lm, load_tokenizer

    if threads:
        torch.set_num_threads(threads)
    tok = load_tokenizer(resolve_model(None).path)
    data = tokenize_for_eval(tok, [d.text for d in load_documents(None, split="heldout")])
    rows = []
    for method in SWEEP_METHODS:
        extend = ExtendConfig(method=method, target_length=SWEEP[-1]) if method else None
        model = load_causal_lm(None, extend=extend, dtype="float32").model
        common = {
            "bos_token_id": tok.bos_token_id,
            "token_bytes": data.token_bytes,
            "num_docs": num_docs,  # a seeded sample: the same documents in every mode
        }
        modes = {
            "longest": (SWEEP[-1:], True),
            "one_pass": (SWEEP, True),
            "per_length": (SWEEP, False),
        }
        times: dict[str, list[float]] = {m: [] for m in modes}
        walls: dict[str, list[float]] = {m: [] for m in modes}
        res: dict[str, dict] = {}
        for r in range(repeats):  # interleaved, rotating order: drift hits every mode alike
            order = list(modes)[r % 3 :] + list(modes)[: r % 3]
            for mode in order:
                lengths, one_pass = modes[mode]
                # CPU time of this process: on a machine shared with other jobs, wall time
                # measures their load as much as ours (both are kept in --json).
                t, c = time.perf_counter(), time.process_time()
                res[mode] = evaluate_lengths(model, data.ids, lengths, one_pass=one_pass, **common)
                times[mode].append(time.process_time() - c)
                walls[mode].append(time.perf_counter() - t)
        timed = {m: (statistics.median(times[m]), res[m]) for m in modes}
        (t_long, long), (t_one, one), (t_sep, sep) = timed.values()
        rows.append(
            {
                "method": method or "base",
                "n_docs": one[SWEEP[-1]].n_docs,
                "longest_s": t_long,
                "one_pass_s": t_one,
                "per_length_s": t_sep,
                "passes": one[SWEEP[-1]].passes,
                "times": times,
                "walls": walls,
                "one_vs_per_length_rel": _max_rel_diff(one, sep),
                "longest_rel": _max_rel_diff({SWEEP[-1]: one[SWEEP[-1]]}, long),
                "ppl": {n: r.ppl for n, r in one.items()},
            }
        )
        print(f"measured {method or 'base'}", file=sys.stderr, flush=True)
    return sweep_table(rows, torch.get_num_threads()), rows


def sweep_table(rows: list[dict], threads: int) -> str:
    lines = [
        "| variant | 2048 only (CPU s) | sweep, one pass (CPU s) | sweep, per length (CPU s) "
        "| one pass / 2048 only | per length / 2048 only | max rel diff one pass vs per length "
        "| max rel diff at 2048 vs 2048 only |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def line(name: str, rs: list[dict]) -> str:
        long, one, sep = (
            sum(r[k] for r in rs) for k in ("longest_s", "one_pass_s", "per_length_s")
        )
        rel1 = max(r["one_vs_per_length_rel"] for r in rs)
        rel2 = max(r["longest_rel"] for r in rs)
        return (
            f"| {name} | {long:.1f} | {one:.1f} | {sep:.1f} | {one / long:.2f} | {sep / long:.2f} "
            f"| {rel1:.1e} | {rel2:.1e} |"
        )

    for r in rows:
        lines.append(line(r["method"], [r]))
    lines.append(line("**all five**", rows))
    lines.append(
        line("static four (all but dynamic)", [r for r in rows if r["method"] != "dynamic"])
    )
    return "\n".join(lines) + (
        f"\n\nbundled model, fp32, {threads} threads, median of {len(rows[0]['times']['longest'])} "
        f"interleaved runs per mode, {rows[0]['n_docs']} held-out files "
        "(with at least 2048 tokens, the same at every length), lengths "
        f"{'/'.join(map(str, SWEEP))}, every method x8; CPU seconds of the process for the "
        "evaluation only (model loading excluded); relative differences of perplexity over every "
        "length and position bucket."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per child (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed passes first")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    ap.add_argument("--out", type=Path, help="also write the Markdown table here")
    ap.add_argument("--json", type=Path, help="also write every raw measurement here")
    ap.add_argument("--sweep", action="store_true", help="time a length sweep (issue 14)")
    ap.add_argument("--num-docs", type=int, help="--sweep: a seeded sample of the documents")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.lengths[0], args.repeats, args.warmup, args.threads)
        return
    if args.sweep:
        text, raw = sweep(args.threads, args.repeats, args.num_docs)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
        if args.json:
            args.json.write_text(json.dumps({"when": time.time(), "sweep": raw}, indent=1))
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
