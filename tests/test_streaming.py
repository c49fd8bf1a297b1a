"""Datasets read by name through `datasets` (streamed): which split each command reads.

The dataset is a local folder laid out as a Hub dataset repo (one .jsonl file per split), so
the real `datasets` library resolves its splits and streams it, with no network.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from conftest import run_cli

from ctxext.corpus import stdlib_documents
from ctxext.data import TRAIN_SPLITS, data_fingerprint, open_source


def _dataset(folder: Path, splits: dict[str, str]) -> Path:
    """Each split gets 30 stdlib files of the given corpus part (train or heldout)."""
    folder.mkdir()
    for split, part in splits.items():
        docs = itertools.islice(stdlib_documents(part), 30)  # type: ignore[arg-type]
        lines = [json.dumps({"text": d.text}) for d in docs]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_finetune_on_a_dataset_without_split_trains_on_train(tmp_path, tiny_llama_session, capsys):
    folder = _dataset(tmp_path / "ds", {"train": "train", "test": "heldout"})
    code, out, err = run_cli(
        capsys, "finetune", tiny_llama_session, "-o", tmp_path / "ft", "-m", "yarn",
        "--factor", "2", "--steps", "2", "--warmup-steps", "0", "--save-every", "0",
        "--data", folder, "--seed", "3", "--json",
    )  # fmt: skip
    assert code == 0, err
    data = json.loads(out)["data"]
    assert data["split"] == "train"
    # The documents it packed are the first ones of the train split's seeded walk.
    walk = open_source(str(folder), default_splits=TRAIN_SPLITS).walk(seed=3)
    assert data["fingerprint"] == data_fingerprint(itertools.islice(walk, data["documents"]))
    provenance = json.loads((tmp_path / "ft" / "ctxext_provenance.json").read_text())
    assert provenance["training"]["data"]["split"] == "train"


def test_eval_results_name_the_split_scored(tmp_path, tiny_llama_session, capsys):
    folder = _dataset(tmp_path / "ds", {"train": "train", "validation": "heldout"})
    code, _, err = run_cli(
        capsys, "eval", tiny_llama_session, "--data", folder, "--lengths", "64",
        "--num-docs", "3", "-o", tmp_path / "res",
    )  # fmt: skip
    assert code == 0, err
    results = json.loads((tmp_path / "res" / "results.json").read_text())
    assert results["data"]["split"] == "validation"  # no test split: validation, never train
    assert results["data"]["n_documents"] == 3
    code, _, err = run_cli(
        capsys, "eval", tiny_llama_session, "--data", folder, "--dataset-split", "train",
        "--lengths", "64", "--num-docs", "3", "-o", tmp_path / "res-train",
    )  # fmt: skip
    assert code == 0, err
    results = json.loads((tmp_path / "res-train" / "results.json").read_text())
    assert results["data"]["split"] == "train"
