"""The runtime probe :func:`ctxext.resources.calibrate.measure_runtime` runs in a fresh
subprocess: the bundled model through eval, a full and a LoRA fine-tune at 64 tokens.

Its own module (imported by no other): it imports the eval pipeline and the fine-tune loop,
and the loop checks its first steps against the calibration (resources.guard), so calibrate
itself must not import them.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

from ctxext.resources.timing import Calibration

__all__ = ["runtime_probe"]


def _peak_rss() -> int:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def runtime_probe() -> None:
    """Run the bundled model through eval, a full and a LoRA fine-tune at 64 tokens; print
    for each the peak RSS minus what :func:`ctxext.resources.estimate.estimate` attributes to the model."""
    import tempfile

    from ctxext import checkpoint, locate
    from ctxext.config import EvalConfig, ExtendConfig, FinetuneConfig
    from ctxext.evaluate.run import run_eval
    from ctxext.evaluate.variants import plan_variants
    from ctxext.finetune.loop import run_finetune
    from ctxext.resources.estimate import estimate
    from ctxext.resources.shape import ModelShape, Workload

    shape = ModelShape.from_config(checkpoint.read_config(locate.bundled_path()))
    zero = Calibration("cpu", {64: 1.0}, {64: 1.0}, 1.0, {})
    out: dict[str, int] = {}
    cfg = EvalConfig(lengths=[64], num_docs=1)
    run_eval(plan_variants([None], [], {}, cfg), cfg)
    out["eval"] = _peak_rss() - estimate(shape, Workload("eval", 64), zero).peak
    extend = ExtendConfig(method="linear", factor=1.25)  # 256 -> 320 tokens
    with tempfile.TemporaryDirectory() as tmp:
        for key, rank in (("finetune", None), ("lora", 4)):
            ft = FinetuneConfig(steps=1, save_every=0, lora_rank=rank, train_length=64)
            run_finetune(None, Path(tmp) / key, extend, ft)
            work = Workload("finetune", 64, lora_rank=rank)
            out[key] = _peak_rss() - estimate(shape, work, zero).peak
    print(json.dumps(out))
