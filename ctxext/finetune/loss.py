"""The training loss: cross-entropy, or LongCE (Fang et al. 2024).

LongCE ("What is wrong with perplexity for long-context language modeling?", ICLR 2025)
re-weights each token's cross-entropy by how much the long context helps to predict it, as the
reference's ``loss_weight`` (PKU-ML/LongPPL finetune/finetune.py, commit 1decd2a, lines 21-44)
and its use (line 220) compute it::

    w_i = min(exp(NLL_short(x_i) - NLL_full(x_i)), gamma)   (gamma = 5; detached: no gradient)
    LongCE = sum_i w_i * NLL_full(x_i) / n                  (n = the tokens scored)

- the weight: ``torch.exp(loss_short - loss_full)`` (line 40) under ``torch.no_grad()``,
  clamped from above only, ``torch.clamp(..., max=thre)`` with ``--threshold`` 5.0 (lines 42,
  316): a token the long context hurts weighs below 1, down to 0, with no floor;
- the loss: ``torch.mean(loss_origin * weight)`` (line 220), a plain mean over the tokens,
  not normalised by the sum of the weights: a token the long context helps gets more gradient
  than under CE without taking any from the others;
- NLL_short is the model's own NLL of the token from LongPPL's short context
  (:func:`ctxext.evaluate.longppl.short_nll`, which cites the reference's loop, lines
  31-40): chunks of W + S positions starting every S positions, so a token at position
  p >= W + S reads its last W to W + S - 1 positions; every other token weighs 1 (line 28; the
  reference also runs the first chunk, whose tokens read their whole context and weigh
  exp(0) = 1). W = ``longce_window`` (the reference's ``trunc_len`` 4096, the original context
  of the Llama-2 it extends; default here: the trained length) and S = ``longce_stride`` (its
  ``internal`` 1024 = W/4; default here: W/4). It runs under no_grad with the weights of the
  current step, in eval mode (no dropout; the reference runs it in train mode, the same for
  the Llamas it trains, which have none).

One difference, on purpose: a row that starts with the BOS token keeps it at the start of every
chunk, in place of the chunk's first text token (the same number of positions as the
reference's chunk), as the full pass starts with BOS: the weight then measures the cut text,
not the loss of an attention sink (the reference's chunks start mid-text).

Cost: per sequence of L tokens, ceil((L - W - S) / S) forward passes of at most W + S tokens
under no_grad, about 5 (L - W - S) tokens at S = W/4: next to a training step's forward and
backward (about 3 forwards of L tokens) that is +1.4x at L = 8W (2048 tokens, W = 256) and
+1.7x at L >> W; the reference (L = 8W = 32768) pays the same, plus its first chunk.
"""

from __future__ import annotations

from typing import Any

#: The cap on a token's weight (the paper's gamma; the reference's ``--threshold`` default 5.0,
#: finetune/finetune.py line 316).
LONGCE_MAX_WEIGHT = 5.0


def longce_weights(
    model: Any,
    input_ids: Any,
    full_nll: Any,
    window: int,
    stride: int,
    max_weight: float = LONGCE_MAX_WEIGHT,
) -> Any:
    """Per-token LongCE weights [B, L-1] for ``input_ids`` [B, L], given the full-context NLL
    ``full_nll`` [B, L-1] (detached here); token t+1 of row b has weight [b, t]. The short
    context: ``window`` W and ``stride`` S as in the module docstring."""
    import torch

    from ctxext.evaluate.longppl import short_nll

    full = full_nll.detach().float()
    bos_id = getattr(model.config, "bos_token_id", None)
    short = torch.stack(
        [
            # A row that starts with BOS keeps it at the start of every short chunk too, so
            # both passes read the same attention sink and only the cut context differs.
            short_nll(model, row.tolist(), window, stride, bos=_starts_with(row, bos_id), full=f)
            for row, f in zip(input_ids, full, strict=True)
        ]
    ).clone()  # out of inference mode: a plain tensor the loss may multiply
    return weights_from_nll(short, full, max_weight)


def weights_from_nll(short: Any, full: Any, max_weight: float = LONGCE_MAX_WEIGHT) -> Any:
    """LongCE's weight of each token from its short- and full-context NLL (tensors of one
    shape): exp(short - full) capped at ``max_weight`` from above, no floor (finetune.py lines
    40 and 42)."""
    import torch

    return torch.exp(short - full).clamp(max=max_weight)


def _starts_with(row: Any, token_id: int | None) -> bool:
    return token_id is not None and int(row[0]) == int(token_id)


def token_losses(logits: Any, labels: Any) -> tuple[Any, Any]:
    """Per-token NLL [B, L-1] of labels[:, 1:] given logits[:, :-1] (0 where the label is
    -100), and the mask of the scored tokens: transformers' causal-LM loss before its mean."""
    import torch.nn.functional as F

    targets = labels[:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1),
        targets.flatten().to(logits.device),
        reduction="none",
        ignore_index=-100,
    ).view(targets.shape)
    return nll, targets != -100


def longce_loss(
    net: Any, model: Any, inputs: dict[str, Any], window: int, stride: int, short_context: Any
) -> tuple[Any, float]:
    """LongCE of one micro-batch through ``net`` (the prepared model; ``model`` is it
    unwrapped, for the short pass, run inside ``short_context``), and its plain CE (logged)."""
    batch = {k: v for k, v in inputs.items() if k != "labels"}
    nll, mask = token_losses(net(**batch).logits, inputs["labels"])
    with short_context:
        weights = longce_weights(model, inputs["input_ids"], nll, window, stride)
    n = mask.sum().clamp(min=1)
    loss = (weights.to(nll.device) * nll * mask).sum() / n
    return loss, float((nll.detach() * mask).sum() / n)
