"""Attention implementation per model (ctxext/modeling.py) and the bf16 path on CPU: rotary
angles in float32 whatever the weights' dtype, bf16 ppl next to fp32, bf16 fine-tune steps."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from conftest import BUNDLED, run_cli
from rope_configs import one_line_error

from ctxext.modeling import choose_attn_implementation, load_causal_lm

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "arch_matrix.py"
_SPEC = importlib.util.spec_from_file_location("arch_matrix_attn", _PATH)
matrix = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(matrix)


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gemma2")
    data = matrix.text_data(root / "data")
    for extra in sorted(data.iterdir())[1:]:
        extra.unlink()  # one document
    return matrix.build("gemma2", root / "model"), data


def _config(model_type: str, **kw):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **kw)


def test_attention_is_chosen_per_model_and_a_wrong_request_is_refused():
    import torch

    llama, gemma2 = _config("llama"), _config("gemma2")
    assert choose_attn_implementation(llama, "cpu", torch.float32) == "sdpa"
    # Gemma 2 softcaps its attention logits: sdpa would skip that (or refuse to load)
    assert choose_attn_implementation(gemma2, "cpu", torch.bfloat16) == "eager"
    assert choose_attn_implementation(llama, "cpu", torch.float32, "eager") == "eager"
    message = one_line_error(choose_attn_implementation, gemma2, "cpu", torch.float32, "sdpa")
    assert "softcap" in message and "eager" in message
    message = one_line_error(
        choose_attn_implementation, llama, "cpu", torch.bfloat16, "flash_attention_2"
    )
    assert "CUDA" in message
    assert "choose one of" in one_line_error(
        choose_attn_implementation, llama, "cpu", torch.float32, "flash"
    )


def test_gemma2_eval_ppl_is_the_models_own_loss(gemma2, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, data = gemma2
    code, out, err = run_cli(
        capsys, "eval", src, "--lengths", "64", "--num-docs", "1", "--data", data, "--json",
        "--force",
    )  # fmt: skip
    assert code == 0, err
    (run,) = json.loads(out)["runs"]
    assert run["attn_implementation"] == "eager"
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, attn_implementation="eager").eval()
    text = next(data.iterdir()).read_text()
    ids = torch.tensor([[tok.bos_token_id, *tok(text, add_special_tokens=False).input_ids[:63]]])
    with torch.no_grad():
        own = math.exp(model(ids, labels=ids).loss.item())
    assert run["ppl"]["64"]["ppl"] == pytest.approx(own, rel=1e-5)


def test_a_load_failure_that_is_not_corruption_says_what_failed(tiny_llama, capsys):
    config = json.loads((tiny_llama / "config.json").read_text())
    config["intermediate_size"] = 96  # the weights are whole, they just do not fit this config
    (tiny_llama / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "eval", tiny_llama, "--lengths", "64", "--num-docs", "1")
    assert code == 2 and err.count("\n") == 1, err
    assert "could not build" in err and "corrupted" not in err


def test_rotary_angles_at_32k_are_float32_in_a_bf16_model():
    """bf16 holds integers exactly only up to 256: an angle computed in bf16 at position 32k
    would be off by whole turns. transformers computes the angles in float32 and only rounds
    cos/sin to the weights' dtype.

    Why exact equality and not the issue's "within 1e-3 of float32": a bf16 tensor cannot hold
    cos/sin to 1e-3. It has 8 significant bits, so rounding a value in [0.5, 1) to bf16 alone
    moves it by up to half a step, 2**-9 ~ 0.002, whatever computed it; no bf16 run can meet a
    1e-3 bound on every element. The strongest claim a bf16 run can satisfy is that its cos/sin
    ARE the float32 values rounded to bf16 (torch.equal below): the angles lost nothing, the
    only error is the unavoidable final rounding (max 2**-9, mean under 1e-3, also asserted).
    An angle computed in bf16 would be off by > 0.1 (the last assertion)."""
    import torch

    lm = load_causal_lm(str(BUNDLED), dtype="bfloat16")
    assert lm.model.dtype == torch.bfloat16
    rot = lm.model.model.rotary_emb
    positions = torch.arange(32_000, 32_064)[None]
    cos16, sin16 = rot(torch.zeros(1, 64, 8, dtype=torch.bfloat16), positions)
    cos32, sin32 = rot(torch.zeros(1, 64, 8, dtype=torch.float32), positions)
    assert cos16.dtype == torch.bfloat16 and cos32.dtype == torch.float32
    assert torch.equal(cos16, cos32.bfloat16()) and torch.equal(sin16, sin32.bfloat16())
    for low, high in ((cos16, cos32), (sin16, sin32)):
        diff = (low.float() - high).abs()
        assert diff.max() <= 2**-9 and diff.mean() < 1e-3
    inv = rot.inv_freq.double()
    angles = positions[0, :, None].double() * inv[None]
    bf16_angles = positions[0, :, None].bfloat16().double() * inv[None]  # what bf16 would do
    assert (bf16_angles.cos() - angles.cos()).abs().max() > 0.1


def test_bf16_eval_ppl_is_within_2_percent_of_fp32_on_the_bundled_model(capsys):
    ppl = {}
    for dtype in ("float32", "bfloat16"):
        code, out, err = run_cli(
            capsys, "eval", "--lengths", "256", "--num-docs", "4", "--dtype", dtype, "--json",
            "--force",
        )  # fmt: skip
        assert code == 0, err
        ppl[dtype] = json.loads(out)["runs"][0]["ppl"]["256"]["ppl"]
    assert ppl["bfloat16"] == pytest.approx(ppl["float32"], rel=0.02)


def test_bf16_full_finetune_steps_have_finite_loss(tmp_path, tiny_llama_session, capsys):
    """Three steps (the first-steps check runs); LoRA in bf16: every type in the matrix."""
    code, out, err = run_cli(
        capsys, "finetune", tiny_llama_session, "-o", tmp_path / "ft", "-m", "yarn", "-f", "2",
        "--steps", "3", "--warmup-steps", "1", "--lr", "1e-3", "--dtype", "bfloat16", "--json",
        "--force",
    )  # fmt: skip
    assert code == 0, err
    assert math.isfinite(json.loads(out)["final_loss"])
