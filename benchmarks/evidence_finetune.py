"""Issue 5's evidence: base, YaRN without fine-tuning, YaRN and linear fine-tuned, at 4x and 8x.

    python benchmarks/evidence_finetune.py --out runs/evidence

For each factor F in (4, 8) on the bundled model (trained at 256 tokens): `ctxext finetune`
with yarn and with linear at 256*F tokens, then `ctxext eval` of the base model, the base
model with yarn / linear applied in memory (no fine-tune) and both fine-tuned checkpoints, at
256 and 256*F tokens on the held-out stdlib files (the same seeded documents for every row).
Prints a Markdown table and the two criteria (fine-tuned yarn >= 10% lower perplexity than
yarn alone at 8x; <= 5% worse than the base model at 256).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def ctxext(*args: str) -> float:
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "ctxext", *args], check=True)
    return time.time() - t0


def ppl_rows(results: Path) -> dict[str, dict[str, float]]:
    doc = json.loads((results / "results.json").read_text())
    return {run["label"]: {n: r["ppl"] for n, r in run["ppl"].items()} for run in doc["runs"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/evidence"))
    ap.add_argument("--factors", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--minutes", type=float, default=4.0, help="fine-tune budget (sets steps)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--num-docs", type=int, default=20)
    args = ap.parse_args()
    lines = []
    for factor in args.factors:
        length = 256 * factor
        seconds_per_sequence = 0.2 * factor * (1 + factor / 16)  # ~1,200 tokens/s, measured
        steps = int(args.minutes * 60 / seconds_per_sequence / args.batch_size)
        ft = ["--steps", str(steps), "--lr", str(args.lr), "--lr-schedule", "cosine"]
        ft += ["--batch-size", str(args.batch_size)]
        ft += ["--warmup-steps", "5", "--save-every", "0", "--overwrite"]
        minutes = {}
        for method in ("yarn", "linear"):
            out = args.out / f"{method}{factor}-ft"
            minutes[method] = (
                ctxext("finetune", "-o", str(out), "-m", method, "-f", str(factor), *ft) / 60
            )
        lengths = f"256,{length}"
        common = ["--lengths", lengths, "--num-docs", str(args.num_docs), "--overwrite"]
        ctxext("eval", "-m", "yarn", "-m", "linear", "-f", str(factor), *common,
               "-o", str(args.out / f"eval-noft-{factor}"))  # fmt: skip
        ctxext("eval", str(args.out / f"yarn{factor}-ft"), str(args.out / f"linear{factor}-ft"),
               *common, "-o", str(args.out / f"eval-ft-{factor}"))  # fmt: skip
        rows = ppl_rows(args.out / f"eval-noft-{factor}") | ppl_rows(args.out / f"eval-ft-{factor}")
        lines.append(
            f"\n#### {factor}x: 256 -> {length} tokens ({steps} fine-tune steps of {args.batch_size} sequences, lr {args.lr})\n"
        )
        lines.append(f"| model | ppl @256 | ppl @{length} |")
        lines.append("|---|---:|---:|")
        for label, ppl in rows.items():
            mins = next(
                (f" ({m:.1f} min)" for k, m in minutes.items() if f"{k}{factor}-ft" in label), ""
            )
            lines.append(f"| {label}{mins} | {ppl['256']:.2f} | {ppl[str(length)]:.2f} |")
        base = rows["stdlib-llama"]["256"]
        noft = next(v for k, v in rows.items() if k.endswith(f"yarn x{factor}"))[str(length)]
        fted = next(v for k, v in rows.items() if f"yarn{factor}-ft" in k)
        lines.append(
            f"\nfine-tuned yarn vs yarn alone at {length}: {fted[str(length)] / noft - 1:+.1%}; "
            f"vs base at 256: {fted['256'] / base - 1:+.1%}"
        )
    text = "\n".join(lines)
    print(text)
    (args.out / "evidence.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
