"""Tiny models, documents and the bundled model shared by the tests of ctxext.evaluate.

Fixtures are registered under their ``name=`` in each test module that imports them.
"""

from __future__ import annotations

import pytest
import torch
from conftest import BUNDLED
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 512
BOS = 1
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


@pytest.fixture(scope="module", autouse=True, name="_one_thread")
def one_thread_fixture():
    """Tiny models gain nothing from threads, and on a busy machine OpenMP threads that wait
    for each other make every forward pass 10-100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(model_cls, config_cls, **extra):
    torch.manual_seed(0)
    config = config_cls(**SMALL, **extra)
    return model_cls(config).eval()


@pytest.fixture(scope="module", name="llama")
def llama_fixture():
    return build(LlamaForCausalLM, LlamaConfig, attn_implementation="sdpa")


@pytest.fixture(scope="module", name="docs")
def docs_fixture():
    g = torch.Generator().manual_seed(1)
    lengths = [40, 150, 97, 300, 64, 220]
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def model_loss_sum(model, seq, first_scored=1):
    """Reference: the model's own loss over targets first_scored..len-1, as a sum (float64)."""
    ids = torch.tensor([seq])
    labels = ids.clone()
    labels[0, :first_scored] = -100  # target t is labels[t]; the model shifts internally
    with torch.inference_mode():
        loss = model(input_ids=ids, labels=labels).loss.double().item()
    n = len(seq) - first_scored
    return loss * n, n


@pytest.fixture(scope="module", name="bundled")
def bundled_fixture():
    from ctxext.evaluate.protocol import tokenize_for_eval
    from ctxext.modeling import load_causal_lm, load_tokenizer

    if not (BUNDLED / "config.json").exists():
        pytest.skip("bundled model not built")
    from ctxext.data import load_documents

    tok = load_tokenizer(BUNDLED)
    texts = [d.text for d in load_documents(None, split="heldout")]
    return load_causal_lm(None, dtype="float32").model, tok, tokenize_for_eval(tok, texts)
