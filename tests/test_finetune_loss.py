"""LongCE: the per-token weights are min(exp(NLL_short - NLL_full), 5), computed explicitly here
on the bundled model; the loss is their weighted mean; a tiny run with it trains."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import BUNDLED, finetune_cfg

from ctxext.config import ExtendConfig
from ctxext.finetune.loop import run_finetune
from ctxext.finetune.loss import LONGCE_MAX_WEIGHT, longce_loss, longce_weights, token_losses

WINDOW = 32


@pytest.fixture(scope="module")
def bundled():
    from transformers import AutoModelForCausalLM

    from ctxext.corpus import stdlib_documents
    from ctxext.modeling import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(BUNDLED, dtype=torch.float32).eval()
    tok = load_tokenizer(BUNDLED)
    text = next(iter(stdlib_documents("heldout"))).text
    ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"][:95]]
    return model, torch.tensor([ids])


def _explicit(model, ids: list[int], sink: bool = True) -> tuple[list[float], list[float]]:
    """Full-context NLL of tokens 1..L-1, and each one's NLL from exactly WINDOW tokens: the
    BOS the row starts with and its last WINDOW-1 tokens (one forward per token; the full NLL
    where nothing is cut). ``sink=False``: the last WINDOW tokens, no BOS."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
        full = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none").tolist()
        short = []
        for p in range(1, len(ids)):
            if p <= WINDOW:
                short.append(full[p - 1])
                continue
            window = ids[:1] + ids[p - WINDOW + 1 : p] if sink else ids[p - WINDOW : p]
            last = model(torch.tensor([window])).logits[0, -1]
            short.append(F.cross_entropy(last[None], torch.tensor([ids[p]])).item())
    return full, short


def test_weights_are_the_formula_and_one_within_the_window(bundled):
    model, ids = bundled
    full, short = _explicit(model, ids[0].tolist())
    want = [min(math.exp(s - f), LONGCE_MAX_WEIGHT) for s, f in zip(short, full, strict=True)]
    full_t = torch.tensor([full])
    got = longce_weights(model, ids, full_t, WINDOW, stride=1)[0]
    assert got.shape == (ids.shape[1] - 1,) and not got.requires_grad
    assert torch.allclose(got, torch.tensor(want), rtol=1e-3, atol=1e-4)
    assert torch.equal(got[:WINDOW], torch.ones(WINDOW))  # positions <= W: nothing is cut
    assert (got[WINDOW:] - 1).abs().max() > 0.05  # past W the weights are not trivially 1
    # Stride S = W/4 (training's default, the reference's ratio): the first target of each
    # chunk (positions W + S, W + 2S, ...) reads exactly W positions; below W + S nothing is cut.
    stride = WINDOW // 4
    quarter = longce_weights(model, ids, full_t, WINDOW, stride=stride)[0]
    assert torch.equal(quarter[: WINDOW + stride - 1], torch.ones(WINDOW + stride - 1))
    for first in range(WINDOW + stride, ids.shape[1], stride):
        assert quarter[first - 1].item() == pytest.approx(want[first - 1], rel=1e-3, abs=1e-4)
    # The cap: a full-context NLL 10 nats lower than the short one weighs 5, no more.
    capped = longce_weights(model, ids, full_t - 10, WINDOW, stride=1)[0]
    assert torch.allclose(capped[WINDOW:], torch.full_like(capped[WINDOW:], 5.0))


def test_a_row_without_bos_reads_plain_windows(bundled):
    model, ids = bundled
    rest = ids[:, 1:]  # the same text without its BOS: the short pass keeps no sink
    full, short = _explicit(model, rest[0].tolist(), sink=False)
    want = [min(math.exp(s - f), LONGCE_MAX_WEIGHT) for s, f in zip(short, full, strict=True)]
    got = longce_weights(model, rest, torch.tensor([full]), WINDOW, stride=1)[0]
    assert torch.allclose(got, torch.tensor(want), rtol=1e-3, atol=1e-4)


def test_the_loss_is_the_weighted_sum_over_the_token_count(bundled):
    model, ids = bundled
    inputs = {"input_ids": ids, "labels": ids}
    loss, ce = longce_loss(model, model, inputs, WINDOW, WINDOW // 2, torch.no_grad())
    nll, mask = token_losses(model(input_ids=ids).logits, ids)
    weights = longce_weights(model, ids, nll, WINDOW, WINDOW // 2)
    assert mask.all() and loss.requires_grad
    assert loss.item() == pytest.approx((weights * nll).sum().item() / nll.numel(), rel=1e-5)
    assert ce == pytest.approx(nll.mean().item(), rel=1e-5)
    assert ce == pytest.approx(model(input_ids=ids, labels=ids).loss.item(), rel=1e-5)


def test_training_with_longce_lowers_the_loss(tmp_path, tiny_llama_session):
    cfg = finetune_cfg(steps=8, loss="longce")  # window: the trained length 128, of 256
    summary = run_finetune(
        str(tiny_llama_session), tmp_path / "o", ExtendConfig(method="yarn", factor=2), cfg
    )
    assert summary["loss"] == {"name": "longce", "window": 128, "stride": 32, "max_weight": 5.0}
    log = [json.loads(x) for x in (tmp_path / "o" / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))
    first, last = log[0], log[-2:]
    assert sum(r["ce"] for r in last) / 2 < first["ce"] - 0.1
    assert sum(r["loss"] for r in last) / 2 < first["loss"] - 0.1
    assert all(r["loss"] != r["ce"] for r in log)  # re-weighted, not plain CE
