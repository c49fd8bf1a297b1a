"""The training loss: cross-entropy, or LongCE (Fang et al. 2024).

LongCE ("What is wrong with perplexity for long-context language modeling?", ICLR 2025)
re-weights each token's cross-entropy by how much the long context helps to predict it::

    w_i = min(exp(NLL_short(x_i) - NLL_full(x_i)), 5)        (detached: no gradient)
    LongCE = sum_i w_i * NLL_full(x_i) / n                    (n = the tokens scored)

NLL_short is the model's own NLL of the token when it reads only its last W tokens
(``longce_window``, default the trained length; a row that starts with the BOS token keeps it:
BOS + the last W-1 tokens, as the full pass also starts with BOS, so the weight measures the
cut context, not the loss of an attention sink), measured under no_grad with the weights of
the current step. This follows the paper's definition, -1/n sum_i I(x_i) log P(x_i | x_<i): the
sum is divided by the number of tokens, not by the sum of the weights: a token the long
context helps (weight above 1) gets more gradient than under CE without taking any from the
others, and the loss is on CE's scale where the long context changes nothing. Tokens at
positions <= W read no more than W tokens in either pass: their two NLLs are the same number
and their weight is exactly 1.

The short pass reuses the context-use evaluation's windows (:func:`ctxext.evaluate.context_use.local_nll`):
fresh windows of W tokens stepping back from the end by a stride S (default W/2), each scoring
the S tokens after its last S positions, so a scored token reads between W-S+1 and W tokens.
Cost: per sequence of L tokens, ceil((L-1-W)/S) extra forward passes of W tokens each, about
(L-W)/S * W tokens, i.e. 2(L-W) tokens at S = W/2, under no_grad: next to a training step's
forward and backward (about 3 forwards of L tokens), roughly +2/3 of the step's compute at
L >> W. S = W halves that but the windows' tokens then read between 1 and W tokens.
"""

from __future__ import annotations

from typing import Any

#: The cap on a token's weight (the paper's gamma).
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
    ``full_nll`` [B, L-1] (detached here); token t+1 of row b has weight [b, t]."""
    import torch

    from ctxext.evaluate.context_use import local_nll

    full = full_nll.detach().float()
    bos_id = getattr(model.config, "bos_token_id", None)
    short = torch.stack(
        [
            # A row that starts with BOS keeps it at the start of every short window too, so
            # both passes read the same attention sink and only the cut context differs.
            local_nll(model, row.tolist(), window, stride, bos=_starts_with(row, bos_id), full=f)
            for row, f in zip(input_ids, full, strict=True)
        ]
    ).clone()  # out of inference mode: a plain tensor the loss may multiply
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
