"""ctxext.finetune.data: PoSE position ids and samples, packing, too little data."""

from __future__ import annotations

import itertools
import random

import torch
from conftest import run_cli

from ctxext.finetune.data import PackedSamples, pack_documents, pose_position_ids
from ctxext.finetune.state import work_dir


def test_pose_positions_increase_and_cover_the_target():
    L, W = 512, 64
    seen = set()
    for i in range(3000):
        pos, split = pose_position_ids(L, W, random.Random(i))
        assert len(pos) == W
        assert all(b > a for a, b in itertools.pairwise(pos))  # strictly increasing
        assert pos[0] == 0 and pos[-1] <= L - 1
        assert pos[:split] == list(range(split))  # first chunk keeps its positions
        assert 1 <= split <= (W + 1) // 2
        seen.update(pos)
    assert max(seen) == L - 1
    assert len(seen) == L  # the windows reach (almost) every position of the target


def test_pose_samples_read_the_text_at_their_positions():
    chunks = torch.arange(3 * 512).view(3, 512)
    ds = PackedSamples(chunks, start=0, count=50, seed=1, window=64)
    for k in range(len(ds)):
        s = ds[k]
        pos = s["position_ids"]
        row = chunks[ds.chunk_index(k)]
        assert torch.equal(s["input_ids"], row[pos])  # true text distances are kept
        jumps = (pos.diff() != 1).nonzero().flatten()
        assert len(jumps) <= 1
        for j in jumps.tolist():  # no label across the skip
            assert s["labels"][j + 1] == -100
        assert (s["labels"] != -100).sum() >= 63
        assert s["attention_mask"].all()
    # Deterministic: the same sample number gives the same sample in a fresh dataset.
    again = PackedSamples(chunks, start=7, count=1, seed=1, window=64)[0]
    assert torch.equal(again["position_ids"], ds[7]["position_ids"])


def test_pose_attention_crosses_the_skip(tiny_llama_session):
    """transformers must not read the position jump as a new packed sequence."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_session).eval()
    chunks = torch.randint(3, 300, (1, 512))
    s = PackedSamples(chunks, start=0, count=1, seed=3, window=64)[0]
    split = int((s["position_ids"].diff() != 1).nonzero()[0]) + 1
    batch = {k: s[k][None] for k in ("input_ids", "position_ids", "attention_mask")}
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][0, 0] = (changed["input_ids"][0, 0] + 1) % 300
    with torch.no_grad():
        a, b = model(**batch).logits, model(**changed).logits
    assert (a[0, split:] - b[0, split:]).abs().max() > 1e-4


def test_too_little_data_says_how_many_tokens(tmp_path, tiny_llama_session, capsys, calibrated):
    # calibrated: the default 400 steps are long by the pessimistic guess, so the pre-run
    # check would measure the machine first.
    text = tmp_path / "small.txt"
    text.write_text("def f(x):\n    return x\n" * 10)
    code, _, err = run_cli(
        capsys, "finetune", tiny_llama_session, "-o", tmp_path / "o", "-m", "yarn", "-f", "4",
        "--data", text, "--batch-size", "2",
    )  # fmt: skip
    assert code == 2 and err.count("\n") == 1
    assert "needs at least 1,024" in err
    assert not (tmp_path / "o").exists() and not work_dir(tmp_path / "o").exists()


def test_pack_documents_frames_every_document_with_bos_and_eos():
    assert pack_documents([[5, 6], [7]], 0, 1) == [0, 5, 6, 1, 0, 7, 1]  # id 0 is a real BOS
    assert pack_documents([[5, 6], [7]], None, 1) == [5, 6, 1, 7, 1]  # no BOS token
    assert pack_documents([[5, 6], [7]], 0, None) == [0, 5, 6, 0, 7]  # no EOS token
    assert pack_documents([], 0, 1) == []
