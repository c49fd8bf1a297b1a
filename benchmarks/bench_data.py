"""Benchmark: `ctxext finetune` and `ctxext eval` on a 2 GB .jsonl dataset read through `datasets`.

The dataset is generated from the shared Gutenberg corpus (../shared/corpus/gutenberg beside
the repository, or /work/shared/corpus/gutenberg): a folder laid out as a Hub dataset repo with
one split, ``train.jsonl``, one book per record (each book repeated with a copy number until the
file reaches ``--gb`` GB). `--data FOLDER` hands it to ``datasets.load_dataset`` by that name.

Rows, each a fresh subprocess (peak RSS = the subprocess's own ru_maxrss):

1. ``ctxext finetune`` (streaming): time from launch to the first optimizer step (the first line
   of the run's log.jsonl) and peak RSS. Wall times depend on what else runs on the machine;
   the CPU seconds (user + system) of each subprocess do not.
2. ``ctxext eval`` (streaming, ``--num-docs 4``): wall time and peak RSS.
3. The data stage alone, streamed: what finetune does before its first step (open the dataset,
   walk it through the seeded shuffle buffer, tokenize and pack the tokens the run needs).
4. The same data stage with a non-streaming load, as ctxext did before: ``load_dataset`` (the
   .jsonl converted to Arrow in a fresh cache) and the text column as Python strings, shuffled
   whole, then the same tokenize-and-pack.

Held fixed between 3 and 4: dataset, tokenizer (the bundled model's), seed, tokens packed
(steps x sequence length of row 1), one document tokenized at a time. Only the load differs.

    python benchmarks/bench_data.py                 # 2 GB, work files in a temporary folder
    python benchmarks/bench_data.py --gb 0.5 --workdir /tmp/bench-data --keep

Targets (issue 13): peak RSS under 1 GB and first optimizer step within 20 s (rows 1-2).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS_CANDIDATES = (ROOT.parent / "shared" / "corpus" / "gutenberg", Path("/work/shared/corpus/gutenberg"))  # fmt: skip
STEPS = 3
FACTOR = 2  # the bundled model (256 tokens) at 512: sequences of 512 tokens
SEQ = 512


def corpus() -> Path:
    for path in CORPUS_CANDIDATES:
        if path.is_dir():
            return path
    sys.exit("the shared Gutenberg corpus is missing (../shared/corpus/gutenberg)")


def make_dataset(folder: Path, gigabytes: float) -> tuple[int, int]:
    """train.jsonl of about ``gigabytes`` GB: one book per record; returns (records, bytes)."""
    books = [p.read_bytes().decode("utf-8", errors="replace") for p in sorted(corpus().glob("*.txt"))]  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    target = int(gigabytes * 2**30)
    records = size = 0
    with open(folder / "train.jsonl", "w", encoding="utf-8") as f:
        while size < target:
            for book in books:
                line = json.dumps({"text": f"[copy {records}]\n{book}"}) + "\n"
                f.write(line)
                size += len(line)
                records += 1
    return records, size


# --------------------------------------------------------------------------- workers (subprocess)


def worker(mode: str, data: str) -> dict:
    """The data stage of a finetune run, streamed (ctxext) or non-streaming (the old load)."""
    from ctxext import locate
    from ctxext.data import TRAIN_SPLITS, Fingerprint, open_source
    from ctxext.finetune.data import pack_until
    from ctxext.modeling import load_tokenizer

    tokenizer = load_tokenizer(locate.bundled_path())
    wanted = STEPS * SEQ
    started = time.perf_counter()
    if mode == "stream":
        docs = open_source(data, default_splits=TRAIN_SPLITS).walk(seed=0)
    else:
        import datasets

        from ctxext.corpus import Document

        ds = datasets.load_dataset(data, split="train")  # Arrow conversion of the whole file
        texts = ds["text"]  # what ctxext did before: the whole column as Python strings
        order = [Document(f"train#{i}", t) for i, t in enumerate(texts)]
        random.Random("ctxext-docs:0").shuffle(order)
        docs = iter(order)
    # One document at a time in both (what load_train_data does with a streamed dataset).
    stream, used, _ = pack_until(docs, tokenizer, wanted, Fingerprint(), batch=1)
    return {"seconds": time.perf_counter() - started, "documents": used, "tokens": len(stream)}


# --------------------------------------------------------------------------- the driver


def _run(cmd: list[str], env: dict, watch: Path | None = None) -> dict:
    """Run ``cmd``; returns wall seconds, peak RSS (MiB), seconds until ``watch`` had a line."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = None
    while watch is not None and first is None and proc.poll() is None:
        if watch.is_file() and watch.stat().st_size > 0:
            first = time.perf_counter() - started
        time.sleep(0.05)
    out = proc.stdout.read().decode()
    err = proc.stderr.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {
        "wall_s": time.perf_counter() - started,
        "cpu_s": usage.ru_utime + usage.ru_stime,  # the same on a busy machine
        "first_step_s": first,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "stdout": out,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=2.0, help="dataset size in GB")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", choices=["stream", "load"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.data)))
        return

    work = args.workdir or Path(tempfile.mkdtemp(prefix="ctxext-bench-data-"))
    data = work / "gutenberg-jsonl"
    cache = work / "hf-datasets-cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_CACHE": str(cache),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    try:
        if not (data / "train.jsonl").is_file():
            records, size = make_dataset(data, args.gb)
        else:
            size = (data / "train.jsonl").stat().st_size
            with open(data / "train.jsonl", encoding="utf-8") as f:
                records = sum(1 for _ in f)
        print(f"dataset: {data}/train.jsonl, {size / 2**30:.2f} GiB, {records:,} records")
        ctxext = [sys.executable, "-m", "ctxext"]
        out = work / "ft"
        rows = {}
        rows["finetune (streaming)"] = _run(
            [*ctxext, "finetune", "stdlib-llama", "--data", str(data), "-m", "yarn",
             "--factor", str(FACTOR), "--steps", str(STEPS), "--warmup-steps", "0",
             "--save-every", "0", "-o", str(out), "--overwrite", "--json"],
            env, watch=work / "ft.ctxext-work" / "log.jsonl",
        )  # fmt: skip
        rows["eval (streaming, --num-docs 4)"] = _run(
            [*ctxext, "eval", "stdlib-llama", "--data", str(data), "--dataset-split", "train",
             "--lengths", "256,1024", "--num-docs", "4", "-o", str(work / "ev"),
             "--overwrite", "--json"],
            env,
        )  # fmt: skip
        me = [sys.executable, str(Path(__file__).resolve()), "--data", str(data)]
        for mode, label in (("stream", "data stage, streaming"), ("load", "data stage, load_dataset")):  # fmt: skip
            shutil.rmtree(cache, ignore_errors=True)  # a cold Arrow cache for the load
            run = _run([*me, "--worker", mode], env)
            run.update(json.loads(run.pop("stdout").strip().splitlines()[-1]))
            rows[label] = run
        for run in rows.values():
            run.pop("stdout", None)
        if args.json:
            print(json.dumps(rows, indent=2))
        _table(rows)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _table(rows: dict) -> None:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"load average at the end: {load} ({os.cpu_count()} CPUs)")
    print("| run | first optimizer step (s) | data ready (s) | wall (s) | CPU (s) | peak RSS (MiB) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in rows.items():
        first = f"{r['first_step_s']:.1f}" if r.get("first_step_s") else "-"
        ready = f"{r['seconds']:.1f}" if "seconds" in r else "-"
        print(
            f"| {label} | {first} | {ready} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} "
            f"| {r['peak_rss_mib']:,.0f} |"
        )


if __name__ == "__main__":
    main()
