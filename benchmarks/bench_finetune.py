"""Benchmark: `ctxext finetune` training throughput and PoSE memory (fp32, CPU).

1. Throughput: tokens/s of our training loop (run_finetune: Accelerate, data pipeline, logging)
   against a bare PyTorch loop on the same model, length and optimizer (AdamW, betas
   (0.9, 0.95), gradient clipping at 1.0): ``loss = model(ids, labels=ids).loss; backward;
   clip; step; zero_grad``. Each run is a fresh subprocess; the first step of each run is a
   warm-up and not timed; the table shows the median over ``--repeats`` runs.
2. Memory: peak RSS (the subprocess's own ru_maxrss) of a short full fine-tune at the target
   length (8x the trained length), of PoSE with window W = the trained length, and of plain
   training on W-token sequences (what PoSE should cost).

3. Scaling out (``--scaling``): a random 82M-parameter Llama (built here, the bundled
   tokenizer) fine-tuned by `ctxext finetune` in 1 process, 2 data-parallel processes
   (``accelerate launch --multi_gpu``, gloo) and 2 FSDP2 processes (the shipped
   ``fsdp_cpu_2proc.yaml``), 1 thread per process, same global batch per step (1 sequence
   per process). Per rank, in one fresh process: first the training state alone (load,
   shard or DDP-wrap, 2 optimizer steps): the bytes of parameters + gradients + AdamW state
   the rank holds (counted tensor by tensor; under FSDP its local shards) and the peak RSS so
   far; then `run_finetune` end to end: tokens/s (global, from ctxext's log, first step
   untimed) and the peak RSS of the whole process.

    python benchmarks/bench_finetune.py                # the bundled model, yarn x8
    python benchmarks/bench_finetune.py --model PATH --factor 4 --repeats 5
    python benchmarks/bench_finetune.py --scaling --skip-throughput --skip-memory
    python benchmarks/bench_finetune.py --scaling --skip-throughput --skip-memory \
        --malloc-mmap-threshold 65536

Targets (issue 5): ours >= 0.8x the bare loop's tokens/s; PoSE peak RSS <= 1.2x plain W-length.
Issue 19: per-rank parameters + gradients + optimizer state drop with the number of FSDP ranks.
"""

from __future__ import annotations

import argparse
import json
import os
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

    from ctxext.config import FinetuneConfig
    from ctxext.finetune.loop import run_finetune
    from ctxext.finetune.state import read_log

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


#: The scaling model: Llama, hidden 768, 12 layers, 12 heads (4 KV heads), MLP 2048, untied
#: embeddings over the bundled 4,096-token vocabulary: 82M parameters.
SCALING_SIZES = {
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


def build_scaling_model(path: Path) -> int:
    """Save a random SCALING_SIZES Llama with the bundled tokenizer; returns its parameters."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ctxext import locate

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(locate.resolve_model("stdlib-llama").path)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), **SCALING_SIZES))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def _local_bytes(tensors) -> int:
    """Bytes a rank holds for these tensors (a DTensor's local shard only)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def _state_bytes(args: argparse.Namespace, cfg) -> dict:
    """Parameters, gradients and AdamW state one rank holds after two optimizer steps, built
    the way run_finetune builds them (ctxext.finetune.model.prepare_model, optim.make_optimizer,
    ctxext.fsdp.shard under an FSDP config, DDP for data parallel)."""
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin

    from ctxext import fsdp
    from ctxext.finetune.model import prepare_model
    from ctxext.finetune.optim import make_optimizer
    from ctxext.modeling import load_causal_lm

    lm = load_causal_lm(args.model, extend=_extend(args.method, args.factor), dtype="float32")
    net, _, _ = prepare_model(lm.model, cfg)
    vocab = net.config.vocab_size
    if args.kind == "fsdp":
        net = fsdp.shard(net, FullyShardedDataParallelPlugin())
    elif args.kind == "dp":  # DDP adds its gradient buckets (not counted below, seen in RSS)
        net = torch.nn.parallel.DistributedDataParallel(net)
    opt = make_optimizer(net, cfg)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        ids = torch.randint(0, vocab, (1, args.train_length), generator=gen)
        net(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    params = list(net.parameters())
    return {
        "params_mb": _local_bytes(params) / 2**20,
        "grads_mb": _local_bytes(p.grad for p in params) / 2**20,
        "optim_mb": _local_bytes(v for st in opt.state.values() for v in st.values()
                                 if torch.is_tensor(v) and v.ndim > 0) / 2**20,
    }  # fmt: skip


def worker_dist(args: argparse.Namespace) -> dict:
    """One rank of the scaling comparison (under accelerate launch, or a lone process)."""
    import gc
    import resource

    from accelerate import PartialState

    from ctxext.config import FinetuneConfig
    from ctxext.finetune.loop import run_finetune
    from ctxext.finetune.state import read_log

    def peak() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    cfg = FinetuneConfig(
        steps=args.steps, lr=2e-5, warmup_steps=1, save_every=0, train_length=args.train_length
    )
    PartialState(cpu=True)  # the process group; run_finetune's Accelerator joins it
    # First the training state alone (fresh process: its peak is load + shard + 2 steps) ...
    state = _state_bytes(args, cfg)
    state_peak = peak()
    gc.collect()
    # ... then ctxext finetune end to end (its peak is the process's peak so far).
    out = Path(args.out)
    run_finetune(args.model, out, _extend(args.method, args.factor), cfg)
    rank = int(os.environ.get("RANK", "0"))
    tps = None
    if rank == 0:
        log = read_log(out / "training_log.jsonl")
        tps = (log[-1]["tokens"] - log[0]["tokens"]) / (log[-1]["elapsed"] - log[0]["elapsed"])
    return {"rank": rank, "tokens_per_s": tps, "state_peak_rss_mb": state_peak,
            "peak_rss_mb": peak(), **state}  # fmt: skip


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


LAUNCH = {
    "single": [],
    "dp": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"],
    "fsdp": ["-m", "accelerate.commands.launch", "--config_file",
             str(ROOT / "ctxext" / "accelerate_configs" / "fsdp_cpu_2proc.yaml")],
}  # fmt: skip


def run_dist(kind: str, args: argparse.Namespace, model: Path, tmp: Path) -> list[dict]:
    """One scaling run: every rank prints a JSON line; returns them sorted by rank."""
    out = tmp / f"out-{kind}"
    shutil.rmtree(out, ignore_errors=True)
    launch = LAUNCH[kind]
    if launch:
        launch = [*launch, "--num_cpu_threads_per_process", "1", "--main_process_port", "29571"]
    cmd = [sys.executable, *launch, __file__, "--worker", "dist", "--kind", kind,
           "--out", str(out), "--model", str(model), "--method", args.method,
           "--factor", str(args.factor), "--steps", str(args.scaling_steps),
           "--train-length", str(args.scaling_length)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if args.malloc_mmap_threshold:
        # glibc then returns every freed block above this size to the OS at once: RSS shows
        # what is live, not the per-layer all-gather buffers the allocator keeps around.
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if res.returncode != 0:
        raise SystemExit(f"scaling run {kind} failed:\n{res.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    rows = [json.loads(x) for x in res.stdout.splitlines() if x.startswith('{"rank"')]
    return sorted(rows, key=lambda r: r["rank"])


def scaling(args: argparse.Namespace, tmp: Path) -> list[str]:
    import time

    model = tmp / "scaling-llama"
    n = build_scaling_model(model)
    names = {"single": "1 process", "dp": "2 processes, data parallel (DDP)",
             "fsdp": "2 processes, FSDP2 (fsdp_cpu_2proc.yaml)"}  # fmt: skip
    lines = [
        f"Scaling out: random Llama, {n / 1e6:.0f}M parameters, fp32, {args.scaling_length}-token "
        f"sequences, 1 sequence per process per step, {args.scaling_steps} steps (first untimed), "
        "1 thread per process"
        + (
            f", glibc MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}"
            if args.malloc_mmap_threshold
            else ", default glibc malloc"
        )
        + "\n",
        "| run | tokens/s (all ranks) | rank | params + grads + AdamW (MB) | peak RSS, load + 2 "
        "steps (MB) | peak RSS, + ctxext finetune run (MB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    started = time.perf_counter()
    for kind, name in names.items():
        for r in run_dist(kind, args, model, tmp):
            state = r["params_mb"] + r["grads_mb"] + r["optim_mb"]
            tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] is not None else ""
            lines.append(
                f"| {name} | {tps} | {r['rank']} | {state:,.0f} ({r['params_mb']:,.0f} + "
                f"{r['grads_mb']:,.0f} + {r['optim_mb']:,.0f}) | {r['state_peak_rss_mb']:,.0f} | "
                f"{r['peak_rss_mb']:,.0f} |"
            )
            print(lines[-1], file=sys.stderr, flush=True)
    lines.append(f"\n({time.perf_counter() - started:.0f} s in all)")
    return lines


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
    ap.add_argument("--scaling", action="store_true", help="1 process vs 2 DP vs 2 FSDP ranks")
    ap.add_argument("--scaling-steps", type=int, default=4, help="steps per scaling run")
    ap.add_argument("--scaling-length", type=int, default=128, help="tokens per sequence")
    ap.add_argument(
        "--malloc-mmap-threshold", type=int, help="scaling runs: glibc MALLOC_MMAP_THRESHOLD_"
    )
    # worker-only options
    ap.add_argument("--worker", choices=["ours", "bare", "dist"])
    ap.add_argument("--kind", choices=["single", "dp", "fsdp"])
    ap.add_argument("--out")
    ap.add_argument("--train-length", type=int)
    ap.add_argument("--pose", action="store_true")
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--lora-rank", type=int)
    args = ap.parse_args()
    if args.worker:
        fn = {"ours": worker_ours, "bare": worker_bare, "dist": worker_dist}[args.worker]
        # One write per line: ranks of a launch share the pipe (no interleaving below 4 KiB).
        sys.stdout.write(json.dumps(fn(args)) + "\n")
        sys.stdout.flush()
        return

    from ctxext import checkpoint, locate, rope

    trained = rope.analyze(checkpoint.read_config(locate.resolve_model(args.model).path))
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
        if args.scaling:
            print("\n".join(scaling(args, Path(tmp))))


if __name__ == "__main__":
    main()
