"""The finished run: LoRA merged, a plain Hugging Face checkpoint written atomically.

Its config.json is exactly what `ctxext extend` writes; tokenizer and generation config are the
source's, with the new length; training_log.jsonl, loss.png and provenance come along.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

from ctxext.config import FinetuneConfig
from ctxext.finetune.model import lora_config
from ctxext.finetune.setup import RunSetup
from ctxext.finetune.state import LOG_FILE, read_log

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def finish(
    acc: Any, net: Any, loaded: Any, setup: RunSetup, cfg: FinetuneConfig, summary: dict[str, Any]
) -> None:
    """Merge LoRA, write the checkpoint atomically (main process), then drop the work folder."""
    acc.wait_for_everyone()
    model = _final_model(acc, net, loaded, cfg)
    if acc.is_main_process:
        if cfg.lora_rank is not None:
            model = model.merge_and_unload()
        _write_output(model, loaded, setup, cfg, summary)
        shutil.rmtree(setup.work, ignore_errors=True)
    acc.wait_for_everyone()


def _final_model(acc: Any, net: Any, loaded: Any, cfg: FinetuneConfig) -> Any:
    """The trained model as one whole module on the main process (None elsewhere).

    Data parallel: the main process's replica is complete. FSDP: parameters are sharded, so
    every rank joins in gathering the full state dict, which the main process loads into a
    fresh CPU copy of the same architecture (and the same LoRA wrapping) before merging.
    """
    from accelerate.utils import DistributedType

    from ctxext import fsdp

    if fsdp.cpu_fsdp_plugin(acc) is not None:
        state = fsdp.full_state_dict(net, acc.is_main_process)  # a collective
    elif acc.distributed_type != DistributedType.FSDP:
        return acc.unwrap_model(net) if acc.is_main_process else None
    else:
        state = acc.get_state_dict(net)  # a collective: all ranks call it
    if not acc.is_main_process:
        return None
    return rebuild_model(loaded.config, cfg, state)


def rebuild_model(config: dict[str, Any], cfg: FinetuneConfig, state: dict[str, Any]) -> Any:
    """A CPU model built from ``config`` (LoRA-wrapped like training) holding ``state``."""
    import torch
    from transformers import AutoModelForCausalLM

    from ctxext.modeling import build_config

    # Built for real on the CPU (not on "meta"): buffers outside the state dict, such as the
    # rotary inverse frequencies, must be computed from the config.
    model = AutoModelForCausalLM.from_config(build_config(config, False), dtype=torch.float32)
    if cfg.lora_rank is not None:
        from peft import get_peft_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(model, lora_config(cfg, model))
    model.load_state_dict(state, strict=True)
    return model


def _save_dtype(config: dict[str, Any]):  # -> torch.dtype
    """Weights are written in the dtype the source checkpoint declares (fp32 if none)."""
    import torch

    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(str(name), torch.float32)


def _write_output(
    model: Any, loaded: Any, setup: RunSetup, cfg: FinetuneConfig, summary: dict[str, Any]
) -> None:
    from ctxext import checkpoint, outputs
    from ctxext.report.plots import plot_loss

    with outputs.atomic_output(setup.out) as tmp:
        model.to(_save_dtype(loaded.config))
        model.save_pretrained(tmp)
        _usual_file_modes(tmp)
        # The config the model was built from, i.e. exactly what `ctxext extend` writes
        # (rope_parameters, legacy rope_scaling mirror, top-level rope_theta, lengths).
        checkpoint.write_json(tmp / "config.json", loaded.config)
        _write_tokenizer(loaded.tokenizer, setup.source.path, tmp, setup.target_length)
        _write_generation_config(setup.source.path, tmp, setup.target_length)
        log = setup.work / LOG_FILE
        if log.is_file():
            shutil.copy2(log, tmp / "training_log.jsonl")
            plot_loss(read_log(log), tmp / "loss.png")
        checkpoint.write_json(
            tmp / checkpoint.PROVENANCE_FILE, _provenance(loaded, setup, cfg, summary)
        )


def _usual_file_modes(folder: Path) -> None:
    """Weights get the mode every other output file gets (0666 minus the umask).

    transformers writes them through a private temporary file, so they arrive 0600: another
    user, or a serving container running as another uid, could read config.json but not the
    weights. Only files save_pretrained just created are touched (never a link to an input).
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.glob("model*.safetensors*"):
        path.chmod(0o666 & ~umask)


def _write_tokenizer(tokenizer: Any, src: Path, dst: Path, new_length: int) -> None:
    """The source's tokenizer files verbatim, with model_max_length set to the new length."""
    from ctxext import checkpoint

    copied = False
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile((src / name).resolve(), dst / name)
            copied = True
    if not copied:
        tokenizer.save_pretrained(dst)
    path = dst / "tokenizer_config.json"
    tok = checkpoint.read_json(path, "") if path.is_file() else {}
    checkpoint.write_json(path, {**tok, "model_max_length": new_length})


def _write_generation_config(src: Path, dst: Path, new_length: int) -> None:
    """Mirror the source: its generation_config.json (max_length raised), or none at all."""
    from ctxext import checkpoint

    path = src / "generation_config.json"
    if not path.is_file():
        (dst / "generation_config.json").unlink(missing_ok=True)
        return
    gen = checkpoint.read_json(path, "")
    if isinstance(gen.get("max_length"), int) and gen["max_length"] < new_length:
        gen["max_length"] = new_length  # a stale default would silently cap generation
    checkpoint.write_json(dst / "generation_config.json", gen)


def _provenance(
    loaded: Any, setup: RunSetup, cfg: FinetuneConfig, summary: dict[str, Any]
) -> dict[str, Any]:
    from ctxext import checkpoint

    return {
        "tool": "ctxext finetune",
        "source": setup.source.record(),
        "method": setup.method,
        "factor": setup.factor,
        "trained_length": setup.trained_length,
        "new_length": setup.target_length,
        "extend": setup.extend.model_dump(mode="json") if setup.extend else None,
        "finetune": cfg.model_dump(mode="json"),
        "config_sha256_before": checkpoint.config_hash(setup.config_before),
        "config_sha256_after": checkpoint.config_hash(loaded.config),
        "training": summary,
        "versions": checkpoint.versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
