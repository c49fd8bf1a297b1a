"""A checkpoint folder: read its config, hash it, check its weight files, write JSON, and the
library versions a result records.

Nothing here loads weights. Finding a model is :mod:`ctxext.locate`'s; writing output folders
atomically is :mod:`ctxext.outputs`'s.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ctxext.errors import CtxextError

PROVENANCE_FILE = "ctxext_provenance.json"
# Files `extend` rewrites instead of linking.
REWRITTEN_FILES = ("config.json", "tokenizer_config.json", "generation_config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object, with a one-line error naming the file if it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CtxextError(f"{path} not found; {what}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CtxextError(f"{path} is not valid JSON ({e}); restore the original file") from e
    if not isinstance(data, dict):
        raise CtxextError(f"{path} is not a JSON object; restore the original file")
    return data


def read_config(model_dir: Path) -> dict[str, Any]:
    """config.json of a model folder, checked to be a transformers model config."""
    config = read_json(
        model_dir / "config.json",
        "this folder is not a Hugging Face model (pass the folder that holds config.json)",
    )
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise CtxextError(
            f"{model_dir / 'config.json'} has no model_type; it is not a transformers model "
            "config (restore the original config.json)"
        )
    return config


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of a config's canonical JSON (key order does not matter)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weight_files(model_dir: Path) -> list[Path]:
    names = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
    return sorted({p for pattern in names for p in model_dir.glob(pattern)})


def weights_readable(model_dir: Path) -> bool:
    """Whether every safetensors file of ``model_dir`` opens (header and sizes consistent) and no
    weight file is empty: False points at truncated or corrupted files, True at another cause."""
    from safetensors import safe_open

    for path in weight_files(model_dir):
        if path.stat().st_size == 0:
            return False
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as f:
                    f.keys()
            except Exception:  # safetensors raises its own error types
                return False
    return True


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def versions() -> dict[str, str]:
    """Versions of the libraries that decide what a result means."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("ctxext", "transformers", "torch", "accelerate", "peft", "huggingface_hub"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out
