"""Benchmark: seconds per optimizer step with plain CE vs LongCE (fp32, CPU, batch 1).

One model (the bundled one extended with YaRN to ``--length``), one AdamW optimizer, steps of
CE and of LongCE alternated (so a machine shared with other jobs slows both alike), each on a
fresh ``--length``-token stdlib sequence: forward, loss, backward, clip, step. LongCE is
``ctxext.finetune.loss.longce_loss`` (the function the training loop calls), short window W =
the trained length, stride ``--stride`` (default W/4, as training's). Reports the median wall
time and the median CPU time of this process (all threads) per step, after one untimed warm-up
step each.

    python benchmarks/bench_longce.py                     # bundled model, 2048 tokens
    python benchmarks/bench_longce.py --steps 8 --stride 256
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="stdlib-llama")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5, help="timed steps of each loss")
    ap.add_argument("--stride", type=int, default=None, help="default: window / 4")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from ctxext import checkpoint, locate, rope
    from ctxext.config import ExtendConfig
    from ctxext.data import load_documents, tokenize_documents
    from ctxext.evaluate.longppl import short_stride
    from ctxext.finetune.loss import longce_loss
    from ctxext.finetune.optim import adamw
    from ctxext.modeling import load_causal_lm

    source = locate.resolve_model(args.model)
    trained = rope.analyze(checkpoint.read_config(source.path)).trained_length
    extend = ExtendConfig(method="yarn", target_length=args.length)
    loaded = load_causal_lm(str(source.path), extend=extend, dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    model.train()
    opt = adamw(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    window, stride = trained, args.stride or short_stride(trained)

    docs = tokenize_documents(tok, load_documents("stdlib", split="train"))
    stream = [t for ids in docs for t in ids]
    n = args.length
    batches = [torch.tensor([stream[i * n : (i + 1) * n]]) for i in range(2 * args.steps + 2)]

    def step(ids: torch.Tensor, loss: str) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        inputs = {"input_ids": ids, "labels": ids}
        if loss == "ce":
            value = model(**inputs).loss
        else:
            ctx = contextlib.nullcontext()
            value, _ = longce_loss(model, model, inputs, window, stride, ctx)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - wall, time.process_time() - cpu

    times: dict[str, list[tuple[float, float]]] = {"ce": [], "longce": []}
    for i, ids in enumerate(batches):
        loss = "ce" if i % 2 == 0 else "longce"
        took = step(ids, loss)
        if i >= 2:  # one warm-up step of each
            times[loss].append(took)
    extra = -(-(n - 1 - window) // stride)
    print(
        f"{args.model} yarn -> {n} tokens, batch 1, fp32 CPU, {args.threads} threads; LongCE "
        f"window {window}, stride {stride}: {extra} extra no-grad forwards of {window} tokens"
    )
    print("| loss | s/step (wall, median) | s/step (CPU, median) |")
    print("|---|---:|---:|")
    for loss, rows in times.items():
        wall = statistics.median(r[0] for r in rows)
        cpu = statistics.median(r[1] for r in rows)
        print(f"| {loss} | {wall:.2f} | {cpu:.2f} |")
    ce = statistics.median(r[1] for r in times["ce"])
    lce = statistics.median(r[1] for r in times["longce"])
    print(f"LongCE / CE (CPU time): {lce / ce:.2f}x")


if __name__ == "__main__":
    main()
