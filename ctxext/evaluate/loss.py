"""The chunked loss through the LM head, and the rotary state between forward passes.

Why not ``model(input_ids, labels=input_ids)``: transformers materialises the logits of every
position, ``[L, vocab]``, and upcasts them to fp32 before the loss (32k tokens x 152k vocab is
18.5 GiB, plus as much again inside ``cross_entropy``). Here the decoder runs once to its final
hidden states (``[L, hidden]``, small), and the LM head + loss run over chunks of positions, so
at most ``[chunk, vocab]`` logits exist at any time. The operations are the ones transformers
runs (head in the model's dtype, the same logit transforms, then fp32 ``cross_entropy``), so the
numbers equal the model's own loss; sums are accumulated in float64.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ctxext.errors import CtxextError

#: ``progress(tokens_done)``: called after forward passes with the tokens fed so far.
Progress = Callable[[int], None]

#: Budget for one chunk of fp32 logits plus the same again inside cross_entropy (log-softmax).
LOGITS_BUDGET_BYTES = 256 * 2**20
#: The chunked loss must agree with the model's own loss this closely on the sanity check.
_HEAD_CHECK_RTOL = 1e-3
_HEAD_CHECK_TOKENS = 32
#: Rope types whose frequencies do not depend on the sequence length (transformers' names).
_STATIC_ROPE_TYPES = frozenset({"default", "linear", "yarn", "llama3"})


def default_chunk_size(vocab_size: int) -> int:
    """Positions per head chunk so that the chunk's fp32 logits (x2) stay within the budget."""
    return max(16, LOGITS_BUDGET_BYTES // (vocab_size * 4 * 2))


def _text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def lm_head(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden [n, H] -> fp32 logits [n, vocab], exactly as the model's forward computes them."""
    embeddings = model.get_output_embeddings()
    if embeddings is None:
        raise CtxextError(
            f"{type(model).__name__} has no output embeddings (LM head); pass a causal LM"
        )
    config = _text_config(model)
    # The transforms some architectures apply after the head, in the order their forward does,
    # in the model's dtype (transformers upcasts only inside the loss).
    scale = getattr(model, "logit_scale", None) or getattr(config, "logit_scale", None)  # Cohere
    divide = getattr(config, "logits_scaling", None)  # Granite
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3

    def head(hidden: torch.Tensor) -> torch.Tensor:
        logits = embeddings(hidden)
        if scale is not None:
            logits = logits * scale
        if divide is not None:
            logits = logits / divide
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits.float()

    return head


def _decoder(model: Any) -> Any:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        decoder = getattr(model, "model", None)
    if decoder is None:
        raise CtxextError(f"cannot find the decoder of {type(model).__name__}; pass a causal LM")
    return decoder


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def final_hidden(
    model: Any, input_ids: torch.Tensor, position_ids: torch.Tensor | None
) -> torch.Tensor:
    """Final (normed) hidden states [L, H] of one sequence; no KV cache is built."""
    device = _device(model)
    kwargs: dict[str, Any] = {}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids.to(device)
        # Without a cache and without a mask, transformers reads any jump in position_ids as
        # the start of another packed sequence and blocks attention across it; an explicit
        # all-ones mask says "one sequence" (as model(...) does through its KV cache).
        kwargs["attention_mask"] = torch.ones_like(input_ids, device=device)
    out = _decoder(model)(input_ids=input_ids.to(device), use_cache=False, **kwargs)
    return out.last_hidden_state[0]


def nll_from_hidden(
    model: Any, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int | None
) -> torch.Tensor:
    """Per-token NLL (fp32) of ``targets`` given ``hidden`` (row i predicts targets[i])."""
    head = lm_head(model)
    chunk = chunk_size or default_chunk_size(_text_config(model).vocab_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk}")
    out = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, targets.shape[0], chunk):
        stop = min(start + chunk, targets.shape[0])
        logits = head(hidden[start:stop])
        # With --device-map auto the LM head may sit on another device than the last layer
        # (tied embeddings: the first one); the targets go where the logits are.
        nll = F.cross_entropy(logits, targets[start:stop].to(logits.device), reduction="none")
        out[start:stop] = nll.to(out.device)
    return out


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Dropout off while evaluating; the caller's training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.inference_mode()
def token_nll(
    model: Any,
    input_ids: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """NLL (fp32, on the model's device) of tokens 1..L-1 of ``input_ids`` [1, L]; length L-1.

    Equals the per-token terms of ``model(input_ids, labels=input_ids).loss`` without ever
    holding more than ``chunk_size`` positions of logits (default: ``default_chunk_size``).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 2:
        raise ValueError(
            f"input_ids must have shape [1, L] with L >= 2, got {tuple(input_ids.shape)}"
        )
    with eval_mode(model):
        hidden = final_hidden(model, input_ids, position_ids)
        return nll_from_hidden(model, hidden[:-1], input_ids[0, 1:], chunk_size)


def accumulate(progress: Progress | None) -> Progress:
    """A tick(n) that adds n tokens and reports the running total to ``progress``."""
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done)

    return tick


def full_nll_by_length(
    model: Any,
    seq: Sequence[int],
    lengths: Sequence[int],
    *,
    one_pass: bool,
    chunk_size: int | None = None,
    tick: Progress | None = None,
) -> dict[int, torch.Tensor]:
    """The full-context NLL of ``seq``'s first n tokens for each n of ``lengths`` (ascending):
    prefixes of one pass at the longest when the rope is static (``one_pass``), else a fresh
    pass per length after a rotary reset (a length-dependent rope gives each length its own
    frequencies). ``tick(n)`` after each pass of n tokens."""
    out: dict[int, torch.Tensor] = {}
    for n in [lengths[-1]] if one_pass else lengths:
        reset_rotary_state(model)
        full = token_nll(model, torch.tensor([list(seq[:n])]), chunk_size=chunk_size)
        if tick is not None:
            tick(n)
        if one_pass:
            out = {m: full[: m - 1] for m in lengths}
        else:
            out[n] = full
    return out


def sweep_sequences(
    model: Any, sequences: Sequence[Sequence[int]], longest: int
) -> list[list[int]]:
    """Each sequence's first ``longest`` tokens, for a sweep of lengths up to ``longest``
    (every sequence must hold them), once the model's head passed :func:`check_head`."""
    seqs = [list(s[:longest]) for s in sequences]
    if any(len(s) < longest for s in seqs):
        raise ValueError("every sequence must hold the longest length")
    check_head(model, seqs[0])
    return seqs


def check_head(model: Any, ids: list[int]) -> None:
    """Refuse models whose forward transforms logits in a way ``lm_head`` does not replicate."""
    x = torch.tensor([ids[:_HEAD_CHECK_TOKENS]])
    with torch.inference_mode(), eval_mode(model):
        ours = token_nll(model, x).double().mean().item()
        theirs = model(input_ids=x.to(_device(model)), labels=x.to(_device(model))).loss.item()
    if not math.isclose(ours, theirs, rel_tol=_HEAD_CHECK_RTOL, abs_tol=1e-6):
        raise CtxextError(
            f"the chunked loss of {type(model).__name__} ({ours:.6f}) differs from its own loss "
            f"({theirs:.6f}): its output head does something ctxext does not replicate; "
            "report the model type"
        )


# ---------------------------------------------------------------------------------------------
# Rotary state: length-dependent rope between passes


def _rope_types(config: Any) -> set[str]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(params, dict) or not params:
        return set()
    entries = [params] if ("rope_type" in params or "type" in params) else list(params.values())
    return {
        str(e.get("rope_type", e.get("type", "default"))) for e in entries if isinstance(e, dict)
    }


def length_dependent_rope(model: Any) -> bool:
    """Whether the model's rope frequencies may depend on the input's length.

    transformers' dynamic NTK recomputes them for longer inputs and longrope switches factor
    lists past the original length; any rope type not known to be static counts as dependent.
    """
    return not _rope_types(_text_config(model)) <= _STATIC_ROPE_TYPES


@torch.inference_mode()
def reset_rotary_state(model: Any) -> None:
    """Put length-dependent rotary state back to its initial value, through the public forward.

    transformers' dynamic NTK keeps the frequencies of the longest input seen so far and goes
    back to the original ones only on an input shorter than the original length, so what an
    input of L tokens gets depends on what ran before. A one-token forward is such an input; a
    static config is unchanged by it. Called before every length and task.
    """
    ids = torch.zeros((1, 1), dtype=torch.long, device=_device(model))
    with eval_mode(model):
        _decoder(model)(input_ids=ids, use_cache=False)
