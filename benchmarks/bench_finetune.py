"""Benchmark: `ctxext finetune` training throughput and PoSE memory (fp32, CPU).

1. Throughput: tokens/s of our training loop (run_finetune: Accelerate, data pipeline, logging)
   against a bare PyTorch loop on the same model, length and optimizer (AdamW, betas
   (0.9, 0.95), gradient clipping at 1.0): ``loss = model(ids, labels=ids).loss; backward;
   clip; step; zero_grad``. Each run is a fresh subprocess; the first step of each run is a
   warm-up and not timed; the table shows the median over ``--repeats`` runs.
2. Memory: peak RSS (the subprocess's own ru_maxrss) of a short full fine-tune at the target
   length (8x the trained length), of PoSE with window W = the trained length, and of plain
   training on W-token sequences (what PoSE should cost).

    python benchmarks/bench_finetune.py                # the bundled model, yarn x8
    python benchmarks/bench_finetune.py --model PATH --factor 4 --repeats 5

Targets (issue 5): ours >= 0.8x the bare loop's tokens/s; PoSE peak RSS <= 1.2x plain W-length.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- workers (subprocess)


def _extend(method: str, factor: float):
    from ctxext.config import ExtendConfig

    return ExtendConfig(method=method, factor=factor)


def worker_ours(args: argparse.Namespace) -> dict:
    """run_finetune end to end; throughput from its per-step log, after the warm-up step."""
    import resource

    from ctxext.finetune import FinetuneConfig, read_log, run_finetune

    out = Path(args.out)
    cfg = FinetuneConfig(
        steps=args.steps,
        lr=2e-5,
        warmup_steps=1,
        save_every=0,
        train_length=args.train_length,
        pose=args.pose,
        grad_ckpt=args.grad_ckpt,
        lora_rank=args.lora_rank,
    )
    summary = run_finetune(args.model, out, _extend(args.method, args.factor), cfg)
    log = read_log(out / "training_log.jsonl")
    timed = log[-1]["elapsed"] - log[0]["elapsed"]  # steps 2..N
    tokens = log[-1]["tokens"] - log[0]["tokens"]
    return {
        "tokens_per_s": tokens / timed,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seq": summary["train_length"],
    }


def worker_bare(args: argparse.Namespace) -> dict:
    """The same model (extended config applied in memory), a plain PyTorch loop."""
    import resource
    import time

    import torch

    from ctxext.modeling import load_causal_lm

    loaded = load_causal_lm(args.model, extend=_extend(args.method, args.factor), dtype="float32")
    model = loaded.model
    model.config.use_cache = False
    model.train()
    seq = args.train_length or round(
        loaded.config.get("original_max_position_embeddings", 0) * args.factor
    )
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    times = []
    for _ in range(args.steps):
        ids = torch.randint(0, vocab, (1, seq), generator=gen)
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t)
    timed = sum(times[1:])
    return {
        "tokens_per_s": seq * (args.steps - 1) / timed,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seq": seq,
    }


# --------------------------------------------------------------------------- orchestration


def run_worker(kind: str, args: argparse.Namespace, tmp: Path, **over) -> dict:
    out = tmp / f"out-{kind}"
    shutil.rmtree(out, ignore_errors=True)
    opts = {
        "model": args.model,
        "method": args.method,
        "factor": args.factor,
        "steps": args.steps,
        "train_length": None,
        "pose": False,
        "grad_ckpt": False,
        "lora_rank": None,
        **over,
    }
    cmd = [sys.executable, __file__, "--worker", kind, "--out", str(out)]
    for key, value in opts.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        cmd += [flag] if value is True else [flag, str(value)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"worker {kind} failed:\n{res.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def throughput(args: argparse.Namespace, tmp: Path) -> list[str]:
    ours, bare = [], []
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
        ours.append(run_worker("ours", args, tmp)["tokens_per_s"])
        bare.append(run_worker("bare", args, tmp)["tokens_per_s"])
    mo, mb = statistics.median(ours), statistics.median(bare)
    return [
        f"| {args.method} x{args.factor:g}, full fine-tune | {mb:,.0f} | {mo:,.0f} | {mo / mb:.2f}x |",
        f"|  runs (bare / ours) | {', '.join(f'{x:,.0f}' for x in bare)} | "
        f"{', '.join(f'{x:,.0f}' for x in ours)} | |",
    ]


def memory(args: argparse.Namespace, tmp: Path) -> list[str]:
    window = args.window
    rows = {
        f"plain, {window}-token sequences": {"train_length": window},
        f"PoSE, window {window} over the target": {"train_length": window, "pose": True},
        "full length (target)": {},
        "full length (target) + --grad-ckpt": {"grad_ckpt": True},
    }
    peaks = {}
    for name, over in rows.items():
        runs = [run_worker("ours", args, tmp, steps=3, **over) for _ in range(args.mem_repeats)]
        peaks[name] = (statistics.median(r["peak_rss_mb"] for r in runs), runs[0]["seq"])
    plain = peaks[f"plain, {window}-token sequences"][0]
    return [
        f"| {name} | {seq} | {peak:,.0f} | {peak / plain:.2f}x |"
        for name, (peak, seq) in peaks.items()
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="stdlib-llama")
    ap.add_argument("--method", default="yarn")
    ap.add_argument("--factor", type=float, default=8.0)
    ap.add_argument("--steps", type=int, default=6, help="steps per throughput run (1 warm-up)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mem-repeats", type=int, default=1)
    ap.add_argument("--window", type=int, default=None, help="PoSE window (default: trained)")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    # worker-only options
    ap.add_argument("--worker", choices=["ours", "bare"])
    ap.add_argument("--out")
    ap.add_argument("--train-length", type=int)
    ap.add_argument("--pose", action="store_true")
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--lora-rank", type=int)
    args = ap.parse_args()
    if args.worker:
        fn = worker_ours if args.worker == "ours" else worker_bare
        print(json.dumps(fn(args)))
        return

    from ctxext import checkpoint, rope

    trained = rope.analyze(checkpoint.read_config(checkpoint.resolve_model(args.model).path))
    args.window = args.window or trained.trained_length
    target = round(trained.trained_length * args.factor)
    print(f"model {args.model}: trained length {trained.trained_length}, target {target}\n")
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        if not args.skip_throughput:
            print(
                f"Training throughput at {target} tokens, batch 1, fp32 CPU, tokens/s "
                f"(median of {args.repeats}; {args.steps - 1} timed steps per run)\n"
            )
            print("| setting | bare PyTorch loop | ctxext finetune | ratio |")
            print("|---|---:|---:|---:|")
            print("\n".join(throughput(args, Path(tmp))), flush=True)
            print()
        if not args.skip_memory:
            print(
                f"Peak RSS of a 3-step fine-tune (fresh process each; {args.method} x"
                f"{args.factor:g})\n"
            )
            print("| run | tokens per sequence | peak RSS (MB) | vs plain W-length |")
            print("|---|---:|---:|---:|")
            print("\n".join(memory(args, Path(tmp))))


if __name__ == "__main__":
    main()
