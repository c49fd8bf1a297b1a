"""The estimator's inputs: a model's shape (read from its config.json alone) and what a run
does with it (:class:`Workload`). Pure: no torch, no weights, no files."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: Tensors below this many elements run on one thread (torch's parallel grain): no latency.
_PARALLEL_GRAIN = 32768

Kind = Literal["eval", "finetune"]


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that decide its memory and FLOPs."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    storage_dtype: str = "float32"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        """Read a transformers config.json (Llama, Mistral, Qwen2 and other Llama-style LMs)."""
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else None
        c = {**config, **(text or {})}
        hidden = int(c["hidden_size"])
        heads = int(c["num_attention_heads"])
        head_dim = int(c.get("head_dim") or hidden // heads)
        qwen_like = str(c.get("model_type", "")).startswith("qwen2")
        attention_bias = bool(c.get("attention_bias", False))
        dtype = str(c.get("dtype") or c.get("torch_dtype") or "float32")
        return cls(
            layers=int(c["num_hidden_layers"]),
            hidden=hidden,
            intermediate=int(c.get("intermediate_size") or 4 * hidden),
            heads=heads,
            kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            vocab=int(c["vocab_size"]),
            tied=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias or qwen_like,
            o_bias=attention_bias,
            mlp_bias=bool(c.get("mlp_bias", False)),
            storage_dtype=dtype if dtype in DTYPE_BYTES else "float32",
        )

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of every linear projection of one layer: q, k, v, o, gate, up, down."""
        h, i = self.hidden, self.intermediate
        attention = [(h, self.q_dim), (h, self.kv_dim), (h, self.kv_dim), (self.q_dim, h)]
        return [*attention, (h, i), (h, i), (i, h)]

    def layer_params(self) -> int:
        weights = sum(a * b for a, b in self.linears())
        bias = (self.q_dim + 2 * self.kv_dim) * self.qkv_bias + self.hidden * self.o_bias
        bias += (2 * self.intermediate + self.hidden) * self.mlp_bias
        return weights + bias + 2 * self.hidden  # + two RMSNorm weights

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    def total_params(self) -> int:
        head = 0 if self.tied else self.vocab * self.hidden
        return self.embedding_params() + head + self.layers * self.layer_params() + self.hidden

    def lora_params(self, rank: int) -> int:
        """LoRA A (rank x in) and B (out x rank) on every linear of every layer."""
        return self.layers * sum(rank * (a + b) for a, b in self.linears())

    def matmul_flops_per_token(self) -> float:
        """Forward FLOPs of the projections and the LM head for one token (2 per MAC)."""
        return 2.0 * (
            self.layers * sum(a * b for a, b in self.linears()) + self.hidden * self.vocab
        )

    def attention_flops_per_token(self, length: int) -> float:
        """Causal attention forward: QK^T and PV over on average L/2 keys, every head, layer."""
        return 2.0 * 2.0 * (length / 2) * self.q_dim * self.layers

    def large_tensors(self) -> int:
        """Weight matrices of at least _PARALLEL_GRAIN elements (AdamW's multi-threaded loops)."""
        per_layer = sum(a * b >= _PARALLEL_GRAIN for a, b in self.linears())
        head = self.vocab * self.hidden >= _PARALLEL_GRAIN
        return self.layers * per_layer + head * (1 if self.tied else 2)

    def elementwise_per_token(self) -> int:
        """Elements read + written by the non-matmul work of one layer for one token: the two
        RMSNorms (~6 passes over H each), the residual adds, RoPE on q and k (~6 passes), the
        attention output's transposed copy, SiLU and the gate * up product."""
        return 18 * self.hidden + 8 * self.q_dim + 6 * self.kv_dim + 5 * self.intermediate

    def saved_per_token(self) -> int:
        """Elements autograd saves per token in one decoder layer (Llama-style, SDPA).

        RMSNorm x2: its input and the normed output (2H each). Attention: the q, k, v
        projections' outputs, RoPE's rotate_half copies and rotated outputs for q and k, SDPA's
        output and the contiguous copy o_proj reads (5 q_dim + 4 kv_dim in all). Gated MLP:
        gate, act(gate), up and their product (4 I).
        """
        return 4 * self.hidden + 5 * self.q_dim + 4 * self.kv_dim + 4 * self.intermediate


@dataclass(frozen=True)
class Workload:
    """What the run does with the model (everything but the model and the device)."""

    kind: Kind
    length: int
    """Tokens per forward (PoSE: the window W; eval: the evaluated length)."""
    batch: int = 1
    """Sequences per micro-step."""
    compute_dtype: str = "float32"
    """Dtype of activations (bf16 under autocast on CUDA)."""
    weight_dtype: str = "float32"
    """Dtype the weights are held in (full fine-tunes keep fp32 master weights)."""
    lora_rank: int | None = None
    lora_trainable: tuple[str, ...] = ("embed", "norm")
    grad_ckpt: bool = False
    steps: int = 1
    """Optimizer steps (finetune)."""
    grad_accum: int = 1
    tokens: int | None = None
    """Tokens fed in all (eval), when known."""
    device_map_auto: bool = False
    """Weights spread by accelerate over every device and CPU RAM (eval --device-map auto)."""
    episodes: bool = False
    """Packed task episodes (finetune --task-min-length): an [L, L] attention mask per sequence."""


def trainable_params(shape: ModelShape, work: Workload) -> int:
    """Parameters the optimizer updates (none for eval; LoRA: adapters and the LongLoRA parts)."""
    if work.kind == "eval":
        return 0
    if work.lora_rank is None:
        return shape.total_params()
    extra = 0
    if "embed" in work.lora_trainable:
        extra += shape.embedding_params()
    if "norm" in work.lora_trainable:
        extra += shape.norm_params()
    return shape.lora_params(work.lora_rank) + extra
