"""Every RoPE architecture ctxext lists, through every command, as a new user would run them.

For each model type of ``ctxext/rope/read.py``'s RoPE list: a tiny random checkpoint built from
its transformers config class (no download) with the bundled tokenizer, then, in process,
``inspect``; ``extend`` with each method (the output reloaded by transformers, its rotary
frequencies and attention scaling equal to the papers' formulas); ``eval`` (ppl, retrieval,
context-use) in float32 and bfloat16; ``finetune`` full and LoRA in float32, LoRA in
bfloat16 (the output reloaded); ``plan`` for eval and finetune. A refusal must be exit 2 with
one line, never a traceback. Every command goes through the CLI entry point, as a user types
it; the checkpoints are as small as the commands allow (hidden 32, one layer where the type
allows, 32 trained tokens extended to 64, one fine-tune step), so that the whole matrix costs
the test suite well under a minute of CPU.

tests/test_arch_matrix.py runs it (one test per type) and checks that docs/architectures.md is
what it finds; ``python benchmarks/arch_matrix.py`` regenerates that table (about a minute).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "ctxext" / "bundled" / "stdlib-llama"
TABLE = ROOT / "docs" / "architectures.md"

TRAINED = 32  # trained length of every tiny checkpoint; extended x2 to LENGTH
LENGTH = 2 * TRAINED
WINDOW = 16  # the sliding window of the types that have one: shorter than LENGTH
SIZES = {
    "hidden_size": 32,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": TRAINED,
}
_MOE = {"num_experts_per_tok": 1}
#: What each type needs beyond SIZES to be tiny and valid (and to have its rope quirks on).
TYPES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": WINDOW},
    "mixtral": {"num_local_experts": 2, **_MOE, "sliding_window": WINDOW},
    "qwen2": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 0},
    "qwen2_moe": {
        "num_experts": 2,
        **_MOE,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 16,
    },
    "qwen3": {},
    "qwen3_moe": {"num_experts": 2, **_MOE, "moe_intermediate_size": 16},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "sliding_window": WINDOW, "num_hidden_layers": 2},
    "gemma3_text": {
        "head_dim": 16,
        "sliding_window": WINDOW,
        "num_hidden_layers": 2,
        "layer_types": ["sliding_attention", "full_attention"],
    },
    "gpt_neox": {},  # rotary_pct 0.25: 4 of 16 dims rotate
    "phi": {},  # partial_rotary_factor 0.5
    "phi3": {"original_max_position_embeddings": TRAINED},
    "phimoe": {
        "num_local_experts": 2,
        "num_experts_per_tok": 2,
        "original_max_position_embeddings": TRAINED,
    },
    "stablelm": {},  # partial_rotary_factor 0.25
    "persimmon": {},  # partial_rotary_factor 0.5
    "starcoder2": {"sliding_window": WINDOW},
    "olmo": {},
    "olmo2": {},
    "cohere": {},
    "granite": {},
    "exaone": {},
    "falcon": {"new_decoder_architecture": True, "num_kv_heads": 1},
}
#: Listed RoPE types the matrix does not build, with why (the table says so).
NOT_BUILT = {
    "internlm2": "remote code only (transformers has no internlm2): needs --trust-remote-code",
    "gemma3": (
        "the multimodal wrapper (Gemma3ForConditionalGeneration): eval and finetune refuse it "
        "as not a causal LM; extend rewrites its text_config; use the gemma3_text checkpoint"
    ),
}
METHOD_COLUMNS = ("linear", "ntk", "yarn", "dynamic", "llama3")
#: The fine-tunes of every type: (column, extra options). bf16 (autocast on the CPU, fp32
#: master weights) runs the LoRA fine-tune: MoE experts' stacked 3-D weights and routers in
#: bf16 are where a dtype slip would show.
FINETUNES = {
    "finetune full": (),
    "finetune LoRA": ("--lora-rank", "4"),
    "finetune LoRA bf16": ("--lora-rank", "4", "--dtype", "bfloat16"),
}


COLUMNS = (
    "inspect",
    *(f"extend {m}" for m in METHOD_COLUMNS),
    "eval fp32",
    "eval bf16",
    *FINETUNES,
    "plan",
)


def build(model_type: str, path: Path) -> Path:
    """A randomly initialised tiny ``model_type`` checkpoint with the bundled tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(BUNDLED)
    ids = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id}
    ids |= {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    config = AutoConfig.for_model(model_type, **{**SIZES, **ids, **TYPES[model_type]})
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def cli(*args: Any) -> tuple[int, str, str]:
    """The real CLI entry point in process: (exit code, stdout, stderr)."""
    from ctxext.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def _refusal(code: int, err: str, what: str) -> str:
    """A refusal's reason; anything but exit 2 with one line is a failure of the matrix."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, f"{what}: {code} {err}"
    return "refused: " + lines[0].removeprefix("error: ")


def _rotary(model: Any, layer_type: str | None) -> tuple[Any, float]:
    (rot,) = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    prefix = f"{layer_type}_" if layer_type else ""
    return getattr(rot, f"{prefix}inv_freq").double().numpy(), float(
        getattr(rot, f"{prefix}attention_scaling")
    )


def check_extend(src: Path, out: Path, method: str) -> str:
    """extend, reload with plain transformers, compare rotary frequencies and scaling with the
    papers' formulas (ctxext.rope.formulas, float64) for the same parameters."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from ctxext.rope import analyze
    from ctxext.rope.formulas import reference_inv_freq

    code, _, err = cli("extend", src, "-o", out, "-m", method, "-f", "2")
    if code:
        return _refusal(code, err, f"extend {method}")
    info = analyze(json.loads((src / "config.json").read_text()))
    model = AutoModelForCausalLM.from_pretrained(out)
    layer = "full_attention" if info.layer_types else None
    got, scale = _rotary(model, layer)
    want, want_scale = reference_inv_freq(
        method, info.rope_theta, info.rotary_dim, 2.0, TRAINED, seq_len=TRAINED
    )
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    assert math.isclose(scale, want_scale, rel_tol=1e-9), (scale, want_scale)
    if layer:  # Gemma 3: the local (sliding) layers keep their unscaled rope
        local, local_scale = _rotary(model, "sliding_attention")
        base, _ = reference_inv_freq(
            "default", info.sliding_rope_theta, info.rotary_dim, 1, TRAINED
        )
        np.testing.assert_allclose(local, base, rtol=1e-6, atol=0)
        assert local_scale == 1.0, local_scale
    return "works"


def text_data(folder: Path) -> Path:
    """Two held-out stdlib documents as text files (reading them is cheaper than the default
    corpus, and the same for every command); made once and shared by every type."""
    from ctxext.corpus import stdlib_documents

    folder.mkdir(parents=True, exist_ok=True)
    docs = (d for d in stdlib_documents("heldout") if len(d.text) > 4000)
    for i, doc in zip(range(2), docs, strict=False):
        (folder / f"doc{i}.txt").write_text(doc.text[:3000])
    return folder


def fixed_calibration() -> Any:
    """A fixed calibration of this device for ``plan`` and the pre-run checks: the matrix
    checks that every architecture is planned (its workloads, parameters, memory), not this
    machine's speed, which tests/test_resources_*.py measure; measuring it costs ~30 s."""
    from ctxext.device import describe_device
    from ctxext.resources.estimate import Calibration

    return Calibration(
        device=describe_device(),
        matmul_flops={64: 1e9, 4096: 1e11},
        attention_flops={512: 1e10, 4096: 3e10},
        bandwidth=1e10,
        runtime={"eval": 400 * 2**20, "finetune": 450 * 2**20, "lora": 480 * 2**20},
    )


def check_eval(src: Path, data: Path, dtype: str) -> tuple[str, dict]:
    code, out, err = cli(
        "eval", src, "--lengths", LENGTH, "-m", "yarn", "-t", LENGTH, "--no-base", "--data", data,
        "--task", "ppl", "--task", "retrieval", "--task", "context-use", "--num-docs", "1",
        "--passkey-trials", "1", "--retrieval-template", "let-assert-equal", "--dtype", dtype,
        "--force", "--json",
    )  # fmt: skip
    if code:
        return _refusal(code, err, f"eval {dtype}"), {}
    (run,) = json.loads(out)["runs"]
    assert run["dtype"] == dtype and run["attn_implementation"] in ("sdpa", "eager"), run
    assert math.isfinite(run["ppl"][str(LENGTH)]["ppl"]), run["ppl"]
    assert run["retrieval"] and run["context_use"], sorted(run)
    # A window shorter than the length evaluated is said on the console (stderr with --json).
    assert ("sliding window:" in err) == bool(run["sliding_window"]), err
    return "works", run


def check_finetune(src: Path, out: Path, data: Path, extra: tuple[str, ...]) -> str:
    """One step; the output reloads in plain transformers and runs at the new length."""
    import torch
    from transformers import AutoModelForCausalLM

    code, stdout, err = cli(
        "finetune", src, "-o", out, "-m", "yarn", "-f", "2", "--steps", "1",
        "--warmup-steps", "0", "--lr", "1e-3", "--data", data, "--force", *extra,
    )  # fmt: skip
    if code:
        return _refusal(code, err, f"finetune {extra}")
    # MoE: the summary and the provenance say the router's auxiliary loss is not added.
    moe = "router_aux_loss_coef" in json.loads((src / "config.json").read_text())
    training = json.loads((out / "ctxext_provenance.json").read_text())["training"]
    assert ("router aux loss" in stdout) == moe == ("router_aux_loss" in training), stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.max_position_embeddings >= LENGTH or model.config.rope_parameters
    with torch.no_grad():
        logits = model(torch.arange(LENGTH)[None] % 100).logits
    assert torch.isfinite(logits).all()
    return "works"


def check_plan(src: Path, out: Path, data: Path) -> str:
    for args in (
        ("eval", src, "--lengths", LENGTH, "-m", "yarn", "--data", data),
        ("finetune", src, "-o", out, "-m", "yarn", "-f", "2", "--steps", "1", "--data", data),
    ):
        code, _, err = cli("plan", *args)
        if code:
            return _refusal(code, err, f"plan {args[0]}")
    return "works"


def run_type(model_type: str, src: Path, work: Path, data: Path) -> dict[str, Any]:
    """Every command on one tiny checkpoint: {column: 'works' | 'refused: ...'} and the two
    eval runs (float32, bfloat16) for the caller's comparisons. ``data``: :func:`text_data`."""
    code, out, err = cli("inspect", src, "--json")
    cells: dict[str, Any] = {"inspect": "works" if code == 0 else _refusal(code, err, "inspect")}
    assert json.loads(out)["model_type"] == model_type
    for method in METHOD_COLUMNS:
        cells[f"extend {method}"] = check_extend(src, work / f"ext-{method}", method)
    runs = {}
    for dtype, name in (("float32", "eval fp32"), ("bfloat16", "eval bf16")):
        cells[name], runs[dtype] = check_eval(src, data, dtype)
    for i, (name, extra) in enumerate(FINETUNES.items()):
        cells[name] = check_finetune(src, work / f"ft-{i}", data, extra)
    cells["plan"] = check_plan(src, work / "plan-ft", data)
    return {"cells": cells, "runs": runs}


def render(results: dict[str, dict[str, str]]) -> str:
    """docs/architectures.md from the matrix's cells (type -> column -> outcome)."""
    reasons: list[str] = []

    def cell(outcome: str) -> str:
        if outcome == "works":
            return "works"
        if outcome not in reasons:
            reasons.append(outcome)
        return f"refused ({reasons.index(outcome) + 1})"

    lines = [
        "# Supported architectures",
        "",
        "Generated by `python benchmarks/arch_matrix.py` from the matrix that",
        "tests/test_arch_matrix.py runs: a tiny random checkpoint of each RoPE model type",
        "(built from its transformers config class, bundled tokenizer) through every command:",
        "`extend` x2 with each method (reloaded by transformers; rotary frequencies and",
        "attention scaling equal to the formulas), `eval` (ppl, retrieval, context-use; yarn",
        "x2) in float32 and bfloat16, `finetune` full and LoRA in float32 and LoRA in bfloat16",
        "(1 step each, reloaded), `plan` for eval and finetune. Do not edit by hand.",
        "",
        "| model_type | " + " | ".join(COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for model_type, cells in results.items():
        lines.append(f"| {model_type} | " + " | ".join(cell(cells[c]) for c in COLUMNS) + " |")
    lines += ["", "Refusals (exit code 2, one line, before any weights load):", ""]
    lines += [f"{i}. {text.removeprefix('refused: ')}" for i, text in enumerate(reasons, 1)]
    lines += ["", "Listed as RoPE in `ctxext/rope/read.py` but not built here:", ""]
    lines += [f"- `{t}`: {why}" for t, why in NOT_BUILT.items()]
    lines += [
        "",
        "Notes, per architecture:",
        "",
        "- Attention: each model loads with the implementation it supports exactly (sdpa;",
        "  eager for Gemma 2, whose attention-logit softcapping sdpa would skip; flash-attention-2",
        "  on CUDA where installed and supported); results.json records it;",
        "  `--attn-implementation` overrides.",
        "- Phi-3 and PhiMoE read only `longrope`: every method but dynamic is written as",
        "  per-pair longrope factors with the same frequencies (`ctxext/rope/longrope.py`).",
        "- Gemma 3: only the global (full-attention) layers' rope is scaled.",
        "- Sliding-window layers (Mistral, Mixtral, Starcoder2, Gemma 2/3, Qwen2 with",
        "  `use_sliding_window`) attend to the last window of tokens at any length: `inspect`",
        "  and results.json (`sliding_window`) say how many layers that is.",
        "- MoE (Mixtral, Qwen2-MoE, Qwen3-MoE, PhiMoE): LoRA adapts the attention, dense and",
        "  expert weights, routers frozen. The router's auxiliary load-balancing loss is not",
        "  added to the training loss, as the models' own loss omits it with their default",
        "  `output_router_logits: false`.",
        "",
    ]
    return "\n".join(lines)


def run_all(work: Path, report: Callable[[str], None] = print) -> dict[str, dict[str, str]]:
    """The matrix, with the cache (and so the calibration) in ``work``."""
    import os

    from ctxext.resources import calibrate

    os.environ[calibrate.CACHE_ENV] = str(work / "cache")
    calibrate.save_calibration(fixed_calibration())
    results, data = {}, text_data(work / "data")
    for model_type in TYPES:
        src = build(model_type, work / model_type / "model")
        results[model_type] = run_type(model_type, src, work / model_type, data)["cells"]
        report(f"{model_type}: {results[model_type]}")
    return results


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        TABLE.write_text(render(run_all(Path(tmp))))
    print(f"wrote {TABLE}")
