"""ctxext.finetune.export: the merged checkpoint a fine-tune writes (plain Hugging Face, LoRA
merged, config.json exactly what `ctxext extend` writes).

Every run trains a tiny Llama (hidden 64, 2 layers, vocab 320, trained length 128) built by
conftest, on the stdlib corpus, for a handful of steps on CPU.
"""

from __future__ import annotations

import json

import torch
from conftest import (
    build_tiny_model,
    finetune_cfg,
    max_weight_diff,
    model_weights,
    run_cli,
)

from ctxext.config import ExtendConfig
from ctxext.finetune.loop import run_finetune
from ctxext.finetune.state import work_dir

YARN2 = ExtendConfig(method="yarn", factor=2)  # 128 -> 256


def test_full_finetune_writes_a_plain_extended_checkpoint(tmp_path, tiny_llama_session, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "ft"
    code, stdout, err = run_cli(
        capsys, "finetune", tiny_llama_session, "-o", out, "--method", "yarn",
        "--factor", "4", "--steps", "3", "--lr", "1e-3", "--warmup-steps", "1", "--json",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["steps"] == 3 and summary["target_length"] == 512
    assert summary["tokens"] == 3 * 512 and summary["final_loss"] > 0
    # config.json is byte-for-byte what `ctxext extend` writes.
    ext = tmp_path / "ext"
    assert run_cli(capsys, "extend", tiny_llama_session, "-o", ext, "-m", "yarn", "-f", "4")[0] == 0
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (ext / "config.json").read_text()
    )
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 512
    model = AutoModelForCausalLM.from_pretrained(out)  # vanilla transformers
    assert model.config.rope_parameters["rope_type"] == "yarn"
    assert model.config.rope_parameters["factor"] == 4.0
    assert AutoTokenizer.from_pretrained(out).model_max_length == 512
    assert (
        max_weight_diff(model_weights(out), model_weights(tiny_llama_session)) > 1e-4
    )  # it trained
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert set(log[0]) >= {"step", "loss", "lr", "tokens", "tokens_per_s", "elapsed"}
    assert (out / "loss.png").stat().st_size > 1000
    prov = json.loads((out / "ctxext_provenance.json").read_text())
    assert prov["tool"] == "ctxext finetune" and prov["method"] == "yarn"
    assert not work_dir(out).exists()


def test_lora_merges_into_a_plain_checkpoint(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoModelForCausalLM

    base = build_tiny_model(tmp_path / "tied", tiny_tokenizer_dir, tie_word_embeddings=True)
    out = tmp_path / "lora"
    summary = run_finetune(
        str(base), out, YARN2, finetune_cfg(lora_rank=4, pose=True, train_length=64)
    )
    assert summary["trainable_parameters"] < summary["parameters"]
    merged, before = model_weights(out), model_weights(base)
    assert not any("lora" in k for k in merged)
    assert merged.keys() == before.keys()
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert (merged[key] - before[key]).abs().max() > 1e-5  # adapters merged in
    assert (
        merged["model.embed_tokens.weight"] - before["model.embed_tokens.weight"]
    ).abs().max() > 0
    assert (merged["model.norm.weight"] - before["model.norm.weight"]).abs().max() > 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings and model.config.max_position_embeddings == 256

    # Adapters only: embeddings and norms stay as they were.
    out2 = tmp_path / "lora-only"
    run_finetune(str(base), out2, YARN2, finetune_cfg(steps=2, lora_rank=4, lora_trainable="none"))
    w = model_weights(out2)
    assert torch.equal(w["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert torch.equal(w["model.norm.weight"], before["model.norm.weight"])


def test_rebuilt_model_merges_like_the_trained_one(tiny_tokenizer_dir, tmp_path):
    """The FSDP output path (gathered state dict -> fresh CPU copy) equals the direct one."""
    from ctxext.finetune.export import rebuild_model
    from ctxext.finetune.model import prepare_model
    from ctxext.modeling import load_causal_lm

    base = build_tiny_model(tmp_path / "tied", tiny_tokenizer_dir, tie_word_embeddings=True)
    cfg = finetune_cfg(lora_rank=4)
    loaded = load_causal_lm(str(base), extend=YARN2, dtype="float32")
    model, _, _ = prepare_model(loaded.model, cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))  # as if trained: adapters, embeddings, norms
    rebuilt = rebuild_model(loaded.config, cfg, model.state_dict())
    ids = torch.randint(3, 300, (1, 200))
    with torch.no_grad():
        expected = model.merge_and_unload().eval()(ids).logits
        got = rebuilt.merge_and_unload().eval()(ids).logits
    assert torch.allclose(expected, got, atol=1e-5)
