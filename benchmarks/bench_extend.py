"""Benchmark: `ctxext extend` vs transformers' from_pretrained + save_pretrained.

Builds a Llama checkpoint of about 800 MB (fp32 safetensors, random weights), then times each
way of writing a YaRN-extended copy in a fresh subprocess (so peak RSS is that process's own),
several times, and prints a Markdown table of medians and ratios. A third row times a Python
process that only imports Typer, pydantic and Rich, a fourth a one-command Typer app that parses
the same arguments and prints one line: the start-up floors of the CLI stack, which ctxext's
own time cannot go below. Each child also reports the operation alone (after its
top-level imports: ``ctxext.cli`` / torch + transformers). Dirty pages are flushed (``os.sync``)
after every run, outside the timing, so a run does not pay for the previous run's writes. The
ctxext package is byte-compiled first, as ``pip install`` leaves it.
``--layers 12 24`` repeats it all at about 880 MB and 1.5 GB.

    python benchmarks/bench_extend.py --repeats 5 --layers 12 24

Target (foundation issue): ctxext >= 20x faster, peak RSS <= 200 MB.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The baseline as a user would write it: load the model, change the config, save it again.
# Each child also prints "OPTIME seconds" on stderr: the operation alone, after its imports.
BASELINE = """
import sys, time, torch
from transformers import AutoModelForCausalLM
src, dst = sys.argv[1], sys.argv[2]
t = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
model.config.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                "original_max_position_embeddings": 2048}
model.config.max_position_embeddings = 8192
model.save_pretrained(dst)
print("OPTIME", time.perf_counter() - t, file=sys.stderr)
"""

OURS = """
import sys, time
from ctxext.cli.app import main
t = time.perf_counter()
try:
    main(["extend", sys.argv[1], "-o", sys.argv[2], "--method", "yarn", "--factor", "4"])
finally:
    print("OPTIME", time.perf_counter() - t, file=sys.stderr)
"""

# What any Typer + pydantic + Rich command pays before doing anything: the start-up floor.
FLOOR = """
import typer, pydantic, rich.console, rich.table
"""

# A one-command Typer app that parses the same arguments as OURS and prints one Rich line: what
# parsing alone costs (Typer 0.29 validates every parameter through a pydantic TypeAdapter).
FLOOR_APP = """
import sys
from pathlib import Path
from typing import Annotated, Optional
import typer
from rich.console import Console
app = typer.Typer(add_completion=False)
@app.callback()
def root() -> None:
    pass
@app.command()
def extend(model: str, output: Annotated[Path, typer.Option("--output", "-o")],
           method: Annotated[str, typer.Option("--method")],
           factor: Annotated[Optional[float], typer.Option("--factor")] = None) -> None:
    Console(stderr=True).print(f"[green]parsed[/green] {model} {output} {method} {factor}")
app(["extend", sys.argv[1], "-o", sys.argv[2], "--method", "yarn", "--factor", "4"])
"""

# Wraps a child script and reports its peak RSS from the OS (ru_maxrss of the child, in KiB).
RUNNER = """
import resource, subprocess, sys, time
t = time.perf_counter()
subprocess.run([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], check=True,
               stdout=subprocess.DEVNULL)
dt = time.perf_counter() - t
print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
"""


def build_checkpoint(path: Path, layers: int) -> float:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e6


def measure(script: str, src: Path, dst: Path) -> tuple[float, float, float | None]:
    """Seconds end to end, peak RSS (MB) and the child's OPTIME (None if it reports none)."""
    shutil.rmtree(dst, ignore_errors=True)
    res = subprocess.run(
        [sys.executable, "-c", RUNNER, script, str(src), str(dst)],
        check=True,
        capture_output=True,
        text=True,
    )
    seconds, rss_mb = map(float, res.stdout.split())
    os.sync()  # the baseline writes the whole checkpoint: flush it before the next run
    op = [float(line.split()[1]) for line in res.stderr.splitlines() if line.startswith("OPTIME")]
    return seconds, rss_mb, (op[0] if op else None)


def bench_size(layers: int, repeats: int) -> dict:
    """Median seconds and peak RSS of each approach on one freshly built checkpoint."""
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        work = Path(tmp)
        size = build_checkpoint(work / "src", layers)
        rows = {}
        for name, script in (
            ("from_pretrained + save_pretrained", BASELINE),
            ("ctxext extend", OURS),
            ("start-up floor: import typer, pydantic, rich", FLOOR),
            ("start-up floor: one-command Typer app, same arguments", FLOOR_APP),
        ):
            runs = [measure(script, work / "src", work / "dst") for _ in range(repeats)]
            ops = [r[2] for r in runs]
            rows[name] = (
                statistics.median(r[0] for r in runs),
                statistics.median(r[1] for r in runs),
                None if None in ops else statistics.median(ops),
            )
    return {"layers": layers, "size_mb": size, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--layers", type=int, nargs="+", default=[12], help="12 layers = about 880 MB each"
    )
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    # pip byte-compiles a package when it installs it; an editable (development) install does
    # not, and with PYTHONDONTWRITEBYTECODE set every run would compile ctxext from source.
    # Compile it once here so each run starts as it would from an installed ctxext.
    compileall.compile_dir(Path(__file__).resolve().parents[1] / "ctxext", quiet=1)
    results = []
    for layers in args.layers:
        res = bench_size(layers, args.repeats)
        rows = res["rows"]
        base_t, base_m, base_op = rows["from_pretrained + save_pretrained"]
        ours_t, ours_m, ours_op = rows["ctxext extend"]
        res["speedup"] = base_t / ours_t
        res["speedup_operation"] = base_op / ours_op
        results.append(res)
        print(
            f"\ncheckpoint: {res['size_mb']:.0f} MB of safetensors ({layers} layers), "
            f"median of {args.repeats} runs each\n"
        )
        print("| approach | seconds, end to end | of which the operation | peak RSS (MB) |")
        print("|---|---:|---:|---:|")
        for name, (t, m, op) in rows.items():
            op_text = "-" if op is None else f"{op:.3f}"  # the floor does no operation
            print(f"| {name} | {t:.2f} | {op_text} | {m:.0f} |")
        print(
            f"\nspeed-up: {base_t / ours_t:.1f}x; ctxext peak RSS {ours_m:.0f} MB "
            f"({ours_m / base_m:.0%} of the baseline's); the operation alone "
            f"(after imports): {base_op / ours_op:.0f}x",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"results": results, "when": time.time()}))


if __name__ == "__main__":
    main()
