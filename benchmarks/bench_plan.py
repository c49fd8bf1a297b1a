"""Benchmark: `ctxext plan`'s predictions against measured peak RSS and time (CPU, fp32).

For two architectures, the bundled model (Llama, 2.4M parameters, trained at 256 tokens) and a
random-weight Qwen2-shaped model built here (hidden 768, 10 layers, 12 heads / 2 KV heads,
intermediate 2048, vocabulary 32,000, untied head, q/k/v biases: 110M parameters, "trained" at
512 tokens), it runs

* eval (perplexity, truncate protocol) at 1k, 2k, 4k and 8k tokens, and
* finetune (yarn to 4x / 2x the trained length): full, LoRA r=8, PoSE (window = trained
  length), gradient checkpointing,

each in a fresh subprocess through the real pipeline (``ctxext.evaluate.run.run_eval`` /
``finetune.run_finetune``), and compares

* peak RSS (the subprocess's own ``ru_maxrss``) with ``estimate.estimate(...).peak``;
* time: eval, seconds per token from the model being loaded to the last forward pass (from
  the progress callback, so loading and tokenizing are not counted); finetune, seconds per optimizer step
  after the first (warm-up) step, from the training log;

against this machine's calibration, measured afresh at the start (``--cached`` reuses the
cached one). Targets (issue 18): memory within +-25%, time within +-50%. The machine's 2 cores
are shared with other jobs: the load average at start and end is printed with the table.

It also prints the estimate for Llama-2-7B at 32k tokens on one 80 GB GPU (full, LoRA r=16,
LoRA + gradient checkpointing; bf16 compute), memory only: time needs a GPU calibration.

    python benchmarks/bench_plan.py              # ~15 min on 2 CPU cores
    python benchmarks/bench_plan.py --only bundled --cached
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QWEN2 = {
    "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 768,
    "intermediate_size": 2048, "num_hidden_layers": 10, "num_attention_heads": 12,
    "num_key_value_heads": 2, "vocab_size": 32000, "max_position_embeddings": 512,
    "rope_theta": 1000000.0, "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
    "bos_token_id": 0, "eos_token_id": 1,
}  # fmt: skip
LLAMA2_7B = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "vocab_size": 32000, "tie_word_embeddings": False,
}  # fmt: skip
#: Documents per eval length: about the same number of tokens at every length.
EVAL_DOCS = {"bundled": {1024: 16, 2048: 8, 4096: 4, 8192: 2}, "qwen2": {1024: 4, 2048: 2, 4096: 1, 8192: 1}}  # fmt: skip
#: (trained length, fine-tune factor, steps) per model.
FINETUNE = {"bundled": (256, 8, 4), "qwen2": (512, 2, 3)}


# --------------------------------------------------------------------------- workers (subprocess)


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker_eval(args: argparse.Namespace) -> dict:
    from ctxext.config import EvalConfig
    from ctxext.evaluate.run import run_eval
    from ctxext.evaluate.variants import plan_variants

    cfg = EvalConfig(lengths=[args.length], num_docs=args.docs)
    ticks: list[tuple[float, int]] = []

    def factory(what: str, total: int):
        # Called once the model is loaded, right before the first forward pass.
        ticks.append((time.perf_counter(), 0))
        return lambda done: ticks.append((time.perf_counter(), done))

    variants = plan_variants([args.model], [], {}, cfg)
    run_eval(variants, cfg, progress_factory=factory)
    (t0, n0), (t1, n1) = ticks[0], ticks[-1]
    return {"peak_rss": _peak_rss(), "seconds_per_token": (t1 - t0) / (n1 - n0)}


def worker_finetune(args: argparse.Namespace) -> dict:
    from ctxext.config import ExtendConfig, FinetuneConfig
    from ctxext.finetune.loop import run_finetune
    from ctxext.finetune.state import read_log

    cfg = FinetuneConfig(
        steps=args.steps, lr=1e-5, warmup_steps=1, save_every=0, lora_rank=args.lora_rank,
        pose=args.pose, train_length=args.train_length, grad_ckpt=args.grad_ckpt,
    )  # fmt: skip
    out = Path(args.out)
    run_finetune(args.model, out, ExtendConfig(method="yarn", factor=args.factor), cfg)
    log = read_log(out / "training_log.jsonl")
    per_step = (log[-1]["elapsed"] - log[0]["elapsed"]) / (len(log) - 1)
    return {"peak_rss": _peak_rss(), "seconds_per_step": per_step}


# --------------------------------------------------------------------------- driver


def _run_worker(kind: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind]
    for k, v in kw.items():
        if v is True:
            cmd.append(f"--{k.replace('_', '-')}")
        elif v not in (None, False):
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"{kind} {kw} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def build_qwen2(path: Path) -> Path:
    """A random-weight Qwen2-shaped model (seeded) with the bundled model's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ctxext.locate import bundled_path

    torch.manual_seed(0)
    data = dict(QWEN2)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(bundled_path() / name, path / name)
    return path


def _cases(name: str) -> list[tuple[str, str, dict, dict]]:
    """(label, worker kind, worker arguments, Workload arguments)."""
    out = []
    for length, docs in EVAL_DOCS[name].items():
        out.append((f"eval {length}", "eval", {"length": length, "docs": docs},
                    {"kind": "eval", "length": length}))  # fmt: skip
    trained, factor, steps = FINETUNE[name]
    target = trained * factor
    variants = {
        "full": ({}, {}),
        "LoRA r=8": ({"lora_rank": 8}, {"lora_rank": 8}),
        f"PoSE W={trained}": ({"pose": True, "train_length": trained}, {"length": trained}),
        "grad ckpt": ({"grad_ckpt": True}, {"grad_ckpt": True}),
    }
    for label, (kw, work) in variants.items():
        args = {"factor": factor, "steps": steps, **kw}
        workload = {"kind": "finetune", "length": target, "steps": steps, **work}
        out.append((f"finetune {target} {label}", "finetune", args, workload))
    return out


def _measure_model(name: str, model: str, calib, tmp: Path, kinds: tuple[str, ...]) -> list[dict]:
    from ctxext import checkpoint, locate
    from ctxext.resources import calibrate, estimate
    from ctxext.resources.shape import ModelShape, Workload

    shape = ModelShape.from_config(checkpoint.read_config(locate.resolve_model(model).path))
    rows = []
    for label, kind, args, work in _cases(name):
        if kind not in kinds:
            continue
        if kind == "finetune":
            args = {**args, "out": tmp / f"{name}-{len(rows)}"}
        # Throughput re-measured right before the run: the shared cores' load changes by the
        # minute, and this separates the time model's error from the neighbours' load.
        now = calibrate.measure_speed(calib)
        measured = _run_worker(kind, model=model, **args)
        est = estimate.estimate(shape, Workload(**work), calib)
        est_now = estimate.estimate(shape, Workload(**work), now)
        key = "seconds_per_token" if kind == "eval" else "seconds_per_step"
        row = {
            "model": name, "run": label, "pred_rss": est.peak, "meas_rss": measured["peak_rss"],
            "pred_time": getattr(est, key), "pred_time_now": getattr(est_now, key),
            "meas_time": measured[key], "time_unit": key, "load": os.getloadavg()[0],
        }  # fmt: skip
        rows.append(row)
        print(_format_row(row), flush=True)
    return rows


def _format_row(r: dict) -> str:
    mem = r["pred_rss"] / r["meas_rss"]
    tim = r["pred_time"] / r["meas_time"]
    now = r["pred_time_now"] / r["meas_time"]
    ok = "yes" if abs(mem - 1) <= 0.25 and abs(now - 1) <= 0.5 else "NO"
    scale, unit = (1e3, "ms/token") if r["time_unit"] == "seconds_per_token" else (1.0, "s/step")
    return (
        f"| {r['model']} | {r['run']} | {r['pred_rss'] / 2**20:,.0f} | {r['meas_rss'] / 2**20:,.0f} "
        f"| {mem:.2f} | {r['meas_time'] * scale:.3g} {unit} | {r['pred_time'] * scale:.3g} "
        f"({tim:.2f}) | {r['pred_time_now'] * scale:.3g} ({now:.2f}) | {r['load']:.1f} | {ok} |"
    )


def llama2_7b_table() -> list[str]:
    from ctxext.resources import estimate
    from ctxext.resources.shape import ModelShape, Workload
    from ctxext.resources.timing import Calibration

    gpu = Calibration(
        device="cuda (80 GB, not calibrated: memory only)",
        matmul_flops={64: 1.0},
        attention_flops={64: 1.0},
        bandwidth=1.0,
        runtime=dict.fromkeys(("eval", "finetune", "lora"), 512 * 2**20),
    )
    shape = ModelShape.from_config(LLAMA2_7B)
    base = {"kind": "finetune", "length": 32768, "compute_dtype": "bfloat16"}
    cases = {
        "full (fp32 master weights, bf16 autocast)": {},
        "LoRA r=16 (+ embed, norm)": {"lora_rank": 16, "weight_dtype": "bfloat16"},
        "LoRA r=16 + grad ckpt": {"lora_rank": 16, "weight_dtype": "bfloat16", "grad_ckpt": True},
    }
    lines = [
        "| Llama-2-7B, 32k tokens, batch 1 | weights | optimizer | gradients | activations "
        "| loss | peak | fits 80 GB? |",
        "|---|---|---|---|---|---|---|---|",
    ]
    gib = 2**30
    for label, kw in cases.items():
        e = estimate.estimate(shape, Workload(**base, **kw), gpu)
        lines.append(
            f"| {label} | {e.weights / gib:.1f} GiB | {e.optimizer / gib:.1f} GiB | "
            f"{e.gradients / gib:.1f} GiB | {e.activations / gib:.1f} GiB | {e.loss / gib:.1f} GiB "
            f"| {e.peak / gib:.1f} GiB | {'yes' if e.peak <= 80e9 else 'no'} |"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", choices=["eval", "finetune"])
    p.add_argument("--model")
    p.add_argument("--length", type=int)
    p.add_argument("--docs", type=int)
    p.add_argument("--factor", type=float)
    p.add_argument("--steps", type=int)
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--pose", action="store_true")
    p.add_argument("--train-length", type=int)
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--out")
    p.add_argument("--only", choices=["bundled", "qwen2"])
    p.add_argument("--cached", action="store_true", help="Reuse the cached calibration.")
    p.add_argument("--kinds", default="eval,finetune", help="eval, finetune or both.")
    args = p.parse_args()
    if args.worker:
        result = (worker_eval if args.worker == "eval" else worker_finetune)(args)
        print(json.dumps(result))
        return
    sys.path.insert(0, str(ROOT))
    from ctxext.resources import calibrate

    kinds = tuple(args.kinds.split(","))
    load = os.getloadavg()
    started = time.time()
    calib = calibrate.load_calibration(refresh=not args.cached)
    print(f"calibration: {json.dumps(calib.__dict__)}", flush=True)
    print("| model | run | predicted peak RSS (MiB) | measured (MiB) | ratio | measured time "
          "| predicted, start calibration (ratio) | predicted, re-measured before the run (ratio) "
          "| load avg | within targets |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "bundled"):
            rows += _measure_model("bundled", "stdlib-llama", calib, Path(tmp), kinds)
        if args.only in (None, "qwen2"):
            model = build_qwen2(Path(tmp) / "qwen2-110m")
            rows += _measure_model("qwen2", str(model), calib, Path(tmp), kinds)
    mem = [r["pred_rss"] / r["meas_rss"] for r in rows]
    tim = [r["pred_time_now"] / r["meas_time"] for r in rows]
    print(
        f"\nmemory ratio range {min(mem):.2f}..{max(mem):.2f}; time ratio (re-measured) range "
        f"{min(tim):.2f}..{max(tim):.2f}; load average {load[0]:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end; {time.time() - started:.0f} s"
    )
    print()
    print("\n".join(llama2_7b_table()))


if __name__ == "__main__":
    main()
