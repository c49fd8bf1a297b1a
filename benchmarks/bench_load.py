"""Benchmark: a fine-tune step and an eval pass, idle and beside a competing load, with the
thread policy of the ctxext CLI (:mod:`ctxext.resources.threads`) against torch's defaults.

The competing load is started here: 2 subprocesses, each torch with 2 intra-op threads (torch's
defaults otherwise) multiplying 512x512 fp32 matrices in a loop. With them a 2-thread job gets
a third of 2 cores: the fair share is 3x slower than idle.

The work, on the bundled model (stdlib-llama) extended 8x with YaRN, fp32, as tiny-yarn runs it:

* fine-tune step: one 2048-token sequence, forward with labels, backward, gradient clipping at
  1.0, AdamW (0.9, 0.95), zero_grad;
* eval pass: ``token_nll`` of one 2048-token sequence (what the perplexity sweep runs).

Each (condition, policy) runs in a fresh subprocess (an OpenMP runtime reads its settings once,
when torch is imported): one untimed warm-up of each, then ``--repeats`` timed fine-tune steps
and ``--repeats`` timed eval passes; the table shows medians of wall seconds and of the
process's CPU seconds (all its threads: a thread spinning while it waits shows up here), and
each median's slowdown against the same policy idle. Policies:

* ``today``: torch's defaults (as ctxext ran before the policy: intra-op threads = cores,
  libgomp's own wait policy), with any OMP_/GOMP_/KMP_ variable of this shell removed;
* ``policy``: what ``ctxext`` applies at start (``threads.apply_policy``), printed in the table.

    python benchmarks/bench_load.py                    # ~5 min on 2 cores
    python benchmarks/bench_load.py --repeats 2        # a quick check
    python benchmarks/bench_load.py --out docs/bench_load.md
    # other candidates beside them (set before torch starts; threads=N: torch.set_num_threads)
    python benchmarks/bench_load.py --policies today policy set:GOMP_SPINCOUNT=1000 set:threads=1

Target (issue "one evaluation house", item 2): under the load both slow down by at most 1.3x
the fair share (3.9x), and idle the policy is within 2% of today.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LENGTH = 2048
LOAD_JOBS, LOAD_THREADS, LOAD_SIZE = 2, 2, 512
FAIR_SHARE = (LOAD_JOBS * LOAD_THREADS + 2) / 2  # 2 threads of ours among 6 on 2 cores
TARGET = 1.3 * FAIR_SHARE
_OMP_PREFIXES = ("OMP_", "GOMP_", "KMP_", "MKL_")
_LOAD_CODE = (
    "import sys, torch\n"
    f"torch.set_num_threads({LOAD_THREADS})\n"
    f"a = torch.randn({LOAD_SIZE}, {LOAD_SIZE})\n"
    "a @ a\n"
    "print('ready', flush=True)\n"
    "while True:\n"
    "    a @ a\n"
)


# --------------------------------------------------------------------------- worker (subprocess)


def worker(args: argparse.Namespace) -> None:
    settings: dict = {}
    threads = None
    if args.policy == "policy":
        from ctxext.resources.threads import apply_policy

        settings = apply_policy()
    elif args.policy.startswith("set:"):  # an experiment: set:OMP_WAIT_POLICY=PASSIVE,threads=1
        for item in args.policy[4:].split(","):
            key, value = item.split("=")
            if key == "threads":
                threads = int(value)
            else:
                settings[key] = os.environ[key] = value
    import torch

    if threads is not None:
        torch.set_num_threads(threads)

    from ctxext.config import ExtendConfig
    from ctxext.evaluate.loss import token_nll
    from ctxext.modeling import load_causal_lm

    torch.manual_seed(0)
    loaded = load_causal_lm(None, extend=ExtendConfig(method="yarn", factor=8.0), dtype="float32")
    model = loaded.model
    ids = torch.randint(3, model.config.vocab_size, (1, LENGTH))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))

    def step() -> None:
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def evaluate() -> None:
        token_nll(model, ids)

    out = {"threads": torch.get_num_threads(), "settings": settings, "env": _omp_env()}
    for name, fn in (("step", step), ("eval", evaluate)):
        fn()  # warm-up: allocator, kernels, thread pool
        walls, cpus = [], []
        for _ in range(args.repeats):
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
        out[name] = {"wall": walls, "cpu": cpus}
    print(json.dumps(out), flush=True)


def _omp_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(_OMP_PREFIXES)}


# --------------------------------------------------------------------------- driver


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OMP_PREFIXES)}
    return {**env, "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error"}


def start_load() -> list[subprocess.Popen]:
    """The competing jobs, each past its first product (threads started) when this returns."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _LOAD_CODE], stdout=subprocess.PIPE, text=True, env=_clean_env()
        )
        for _ in range(LOAD_JOBS)
    ]
    for p in procs:
        if p.stdout is None or p.stdout.readline().strip() != "ready":
            stop_load(procs)
            raise SystemExit("a competing load job failed to start")
    return procs


def stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def run_worker(policy: str, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--policy", policy, "--repeats", str(repeats)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(), cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"worker {policy} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace) -> dict[tuple[str, str], dict]:
    results: dict[tuple[str, str], dict] = {}
    for condition in args.conditions:
        procs = start_load() if condition == "load" else []
        try:
            for policy in args.policies:
                t0 = time.time()
                results[condition, policy] = run_worker(policy, args.repeats)
                res = results[condition, policy]
                res["loadavg"] = os.getloadavg()[0]
                meds = "  ".join(
                    f"{w} {statistics.median(res[w]['wall']):.3f} s wall "
                    f"{statistics.median(res[w]['cpu']):.3f} s CPU"
                    for w in ("step", "eval")
                )
                print(f"{condition} {policy}: {meds} ({time.time() - t0:.0f} s)", file=sys.stderr)
        finally:
            stop_load(procs)
    return results


def table(results: dict[tuple[str, str], dict], args: argparse.Namespace) -> str:
    med = statistics.median
    lines = [
        "| work | policy | threads | idle wall s | idle CPU s | load wall s | load CPU s "
        f"| slowdown (target <= {TARGET:.1f}x) | idle vs today |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for work in ("step", "eval"):
        base = med(results["idle", "today"][work]["wall"]) if "today" in args.policies else None
        for policy in args.policies:
            idle, load = results["idle", policy], results["load", policy]
            iw, ic = med(idle[work]["wall"]), med(idle[work]["cpu"])
            lw, lc = med(load[work]["wall"]), med(load[work]["cpu"])
            slow = lw / iw
            vs = "" if base is None else f"{iw / base - 1:+.1%}"
            threads = f"{idle['threads']} / {load['threads']}"
            name = "fine-tune step" if work == "step" else "eval pass"
            lines.append(
                f"| {name} | {policy} | {threads} | {iw:.3f} | {ic:.3f} | {lw:.3f} | {lc:.3f} "
                f"| {slow:.2f}x | {vs} |"
            )
            if policy == "policy":
                verdicts.append(
                    f"{name}: {slow:.2f}x under load ({'ok' if slow <= TARGET else 'MISSED'})"
                )

    def settings(condition: str) -> str:
        env = results[condition, "policy"]["env"] if "policy" in args.policies else {}
        return ", ".join(f"{k}={v}" for k, v in sorted(env.items())) or "none"

    load_avg = ", ".join(f"{results[k]['loadavg']:.1f}" for k in results)
    head = [
        f"bundled model, yarn x8, {LENGTH} tokens, fp32; medians of {args.repeats} runs after a "
        f"warm-up; competing load: {LOAD_JOBS} torch jobs x {LOAD_THREADS} threads "
        f"({LOAD_SIZE}x{LOAD_SIZE} matmul loop), fair share {FAIR_SHARE:g}x; "
        f"{os.cpu_count()} cores; threads: idle / load",
        f"policy's settings: idle: {settings('idle')}; under load: {settings('load')}",
        f"1-min load average after each run: {load_avg}",
        "",
    ]
    return "\n".join([*head, *lines, "", *verdicts]) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--policies", nargs="+", default=["today", "policy"])
    ap.add_argument("--conditions", nargs="+", default=["idle", "load"], help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--policy", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    started = time.time()
    text = table(measure(args), args) + f"\n{time.time() - started:.0f} s in all\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
