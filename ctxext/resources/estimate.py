"""Memory and time a run will need, from the model's config.json and the run's settings alone.

Pure: no torch, no weights, no files. :mod:`ctxext.resources.calibrate` measures this device once
(matmul and attention throughput, memory bandwidth, the resident size of the Python/torch
runtime) and this module turns a config + a workload into the figures `ctxext plan` prints.

The memory model counts what PyTorch keeps alive at the peak of a step, per component:

* weights: every parameter in its storage dtype (LoRA: the frozen base in the compute dtype,
  adapters and the LongLoRA-trainable embeddings/norms in fp32);
* optimizer: AdamW's two fp32 moments per trainable parameter (created at the first step);
* gradients: one fp32 gradient per trainable parameter;
* activations: the tensors autograd saves for the backward pass, counted per token per layer
  from a Llama-style decoder (see :func:`saved_per_token`); with gradient checkpointing only each
  layer's input is kept, plus one layer's full set while it is recomputed;
* attention: the fused SDPA kernels keep O(L) (a log-sum-exp per head per token), never the
  [heads, L, L] matrix; with packed task episodes also their block mask, one [L, L] tensor per
  sequence in the compute dtype that every layer shares (:mod:`ctxext.finetune.episodes`);
* loss: fine-tuning uses the model's own loss, which holds [L, vocab] fp32 logits, their
  log-softmax and its gradient (three copies at the start of the backward); eval uses ctxext's
  chunked loss, at most ``chunk x vocab`` fp32 logits twice (``evaluate.default_chunk_size``).

Gradients are freed after every optimizer step (``zero_grad(set_to_none=True)``) and the saved
activations are freed as the backward pass walks down the layers, so the two never coexist in
full: the peak is weights + optimizer + runtime + max(gradients, activations + attention + loss).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from ctxext.finetune.episodes import mask_bytes

__all__ = [
    "DTYPE_BYTES",
    "Calibration",
    "Estimate",
    "ModelShape",
    "Workload",
    "estimate",
    "format_bytes",
    "parse_bytes",
    "suggest_changes",
]

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: Positions per chunk of eval's loss: the same rule as evaluate.default_chunk_size (256 MiB
#: of fp32 logits, counted twice), restated here so that planning imports no torch.
_LOGITS_BUDGET_BYTES = 256 * 2**20
#: AdamW moments (exp_avg, exp_avg_sq) per trainable parameter, fp32.
_ADAM_BYTES = 8
#: fp32 logits, their log-softmax and its gradient exist together when the backward starts.
_TRAIN_LOSS_COPIES = 3
#: A matmul's forward FLOPs are repeated this often in a full training step (forward, input
#: gradients, weight gradients); LoRA skips the frozen weights' gradients.
_FULL_PASSES, _LORA_PASSES = 3.0, 2.0
#: Attention backward recomputes the probabilities (flash-style kernels): ~2.5x the forward.
_ATTN_BACKWARD = 2.5
#: AdamW reads parameter, gradient, two moments and writes three of them: 7 fp32 touches.
_ADAM_TOUCHES = 7 * 4
#: Multi-threaded kernels per decoder layer forward (RMSNorm ~6 x2, q/k/v/o, RoPE ~10, SDPA,
#: the output copy, residual adds, gate/up/SiLU/product/down), outside the layers (embedding,
#: rotary tables, final norm, head, loss), and per large parameter tensor in AdamW's step
#: (single-tensor on CPU: ~7 kernels each). Each costs the calibrated op latency: microseconds
#: on an idle machine, a scheduler slice on a busy one, where it dominates small models.
_OPS_PER_LAYER, _OPS_OUTSIDE, _ADAM_OPS_PER_TENSOR = 40, 12, 7
#: Tensors below this many elements run on one thread (torch's parallel grain): no latency.
_PARALLEL_GRAIN = 32768
#: A training step's backward moves about twice the forward's elementwise traffic, in about
#: as many kernels (autograd's elementwise gradients come fused in fewer, larger kernels).
_BACKWARD_ELEMENTWISE, _BACKWARD_OPS = 2.0, 1.0

Kind = Literal["eval", "finetune"]


# --------------------------------------------------------------------------- model shape


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


# --------------------------------------------------------------------------- inputs


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


@dataclass(frozen=True)
class Calibration:
    """This device, measured by :mod:`ctxext.resources.calibrate` (see there for how)."""

    device: str
    matmul_flops: dict[int, float]
    """Sustained FLOP/s of [M, k] @ [k, k] products by k."""
    attention_flops: dict[int, float]
    """FLOP/s of causal SDPA (forward, 64-dim heads) by sequence length."""
    bandwidth: float
    """Bytes/s of a large elementwise update (what AdamW's step is bound by)."""
    runtime: dict[str, int] = field(default_factory=dict)
    """Resident bytes of the process before any model-sized tensor: Python, torch, transformers,
    ctxext and its libraries, a tiny model run once ("eval", "finetune", "lora")."""
    op_seconds: float = 0.0
    """Latency of one small multi-threaded kernel (launch, thread wake-up and barrier)."""
    load: float | None = None
    """The 1-minute load average when the speeds were measured (None: not recorded)."""
    threads: int | None = None
    """torch's intra-op threads when the speeds were measured."""

    def rate(self, k: float) -> float:
        """Matmul FLOP/s at inner size k, interpolated in log-log between calibrated sizes."""
        return _loglog(self.matmul_flops, k)

    def attention_rate(self, length: int) -> float:
        """Causal SDPA FLOP/s at ``length`` tokens (short sequences run far below peak)."""
        return _loglog(self.attention_flops, length)


def _loglog(table: dict[int, float], x: float) -> float:
    """Piecewise log-log interpolation of ``table`` at ``x``, clamped at both ends."""
    sizes = sorted(table)
    x = min(max(x, sizes[0]), sizes[-1])
    for lo, hi in itertools.pairwise(sizes):
        if lo <= x <= hi:
            t = (math.log(x) - math.log(lo)) / (math.log(hi) - math.log(lo))
            a, b = math.log(table[lo]), math.log(table[hi])
            return math.exp(a + t * (b - a))
    return table[sizes[-1]]


@dataclass(frozen=True)
class Estimate:
    """Peak memory by component (bytes) and time (seconds) of one workload."""

    params_total: int
    params_trainable: int
    runtime: int
    weights: int
    optimizer: int
    gradients: int
    activations: int
    activations_other: int
    """Activations with gradient checkpointing switched the other way (for comparison)."""
    attention: int
    loss: int
    peak: int
    seconds_per_step: float
    """One optimizer step (finetune) or one forward of ``length`` tokens (eval)."""
    seconds_per_token: float
    seconds: float | None
    """The whole run, when its size is known."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- the estimate


def estimate(shape: ModelShape, work: Workload, calib: Calibration) -> Estimate:
    """Memory by component and time for ``work`` on ``shape`` on the calibrated device."""
    trainable = _trainable(shape, work)
    weights = _weights_bytes(shape, work)
    act_on, act_off = _activation_bytes(shape, work, True), _activation_bytes(shape, work, False)
    activations = act_on if work.grad_ckpt else act_off
    attention = _attention_bytes(shape, work)
    loss = _loss_bytes(shape, work)
    gpu = work.device_map_auto and not calib.device.startswith("cpu")
    if work.kind == "eval":
        optimizer = gradients = 0
        transient = activations + attention + loss
        resident = 0 if gpu else weights  # spread over the devices: ~nothing stays here
    else:
        optimizer, gradients = _ADAM_BYTES * trainable, 4 * trainable
        transient = max(gradients, activations + attention + loss)
        resident = weights + optimizer
    runtime = _runtime(calib, work)
    per_step = _step_seconds(shape, work, calib)
    tokens_per_step = work.length * work.batch * work.grad_accum
    total = None
    if work.kind == "finetune":
        total = per_step * work.steps
    elif work.tokens is not None:
        total = per_step * work.tokens / tokens_per_step
    return Estimate(
        params_total=shape.total_params()
        + (shape.lora_params(work.lora_rank) if work.lora_rank else 0),
        params_trainable=trainable,
        runtime=runtime,
        weights=weights,
        optimizer=optimizer,
        gradients=gradients,
        activations=activations,
        activations_other=act_off if work.grad_ckpt else act_on,
        attention=attention,
        loss=loss,
        peak=runtime + resident + transient,
        seconds_per_step=per_step,
        seconds_per_token=per_step / tokens_per_step,
        seconds=total,
    )


def _trainable(shape: ModelShape, work: Workload) -> int:
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


def _weights_bytes(shape: ModelShape, work: Workload) -> int:
    base = shape.total_params() * DTYPE_BYTES[work.weight_dtype]
    if work.kind == "eval" or work.lora_rank is None:
        return base
    # LoRA adapters and the parts LongLoRA trains are fp32 whatever the base dtype is.
    fp32_extra = _trainable(shape, work) * 4
    upcast = (_trainable(shape, work) - shape.lora_params(work.lora_rank)) * (
        DTYPE_BYTES[work.weight_dtype]
    )
    return base + fp32_extra - upcast


def _activation_bytes(shape: ModelShape, work: Workload, ckpt: bool) -> int:
    a = DTYPE_BYTES[work.compute_dtype]
    tokens = work.length * work.batch
    if work.kind == "eval":
        # No autograd: only the layer being run lives, at most its MLP (gate/up/act/product,
        # three alive at once) next to the residual stream and the normed input.
        return tokens * (3 * shape.intermediate + 3 * shape.hidden) * a
    layer = shape.saved_per_token() * a * tokens
    if work.lora_rank is not None:
        # peft saves each adapter's rank-r intermediate (for lora_B's gradient); lora_A reads
        # the projection's input, which is saved already, and its output sum is not saved.
        layer += tokens * a * work.lora_rank * len(shape.linears())
    # The embedding output and the final norm's input/output sit outside the layers.
    outside = 3 * shape.hidden * a * tokens
    if ckpt:
        return shape.layers * shape.hidden * a * tokens + layer + outside
    return shape.layers * layer + outside


def _attention_bytes(shape: ModelShape, work: Workload) -> int:
    # Fused SDPA keeps a fp32 log-sum-exp per head per token for the backward; eval keeps none.
    if work.kind == "eval":
        return 0
    lse = shape.layers * shape.heads * work.length * work.batch * 4
    if not work.episodes:
        return lse
    return lse + mask_bytes(work.batch, work.length, DTYPE_BYTES[work.compute_dtype])


def _loss_bytes(shape: ModelShape, work: Workload) -> int:
    tokens = work.length * work.batch
    if work.kind == "eval":
        chunk = max(16, _LOGITS_BUDGET_BYTES // (shape.vocab * 4 * 2))
        return 2 * min(chunk, work.length) * shape.vocab * 4
    return _TRAIN_LOSS_COPIES * tokens * shape.vocab * 4


def _runtime(calib: Calibration, work: Workload) -> int:
    key = "eval" if work.kind == "eval" else "lora" if work.lora_rank else "finetune"
    return int(calib.runtime.get(key, 0))


def _step_seconds(shape: ModelShape, work: Workload, calib: Calibration) -> float:
    """Forward (eval) or forward + backward + AdamW (finetune) of one optimizer step:
    matmul and attention FLOPs at their measured throughput, elementwise traffic at the
    measured bandwidth, and kernel launches at the measured op latency."""
    tokens = work.length * work.batch * work.grad_accum
    matmul = _matmul_seconds(shape, calib) * tokens
    attn = shape.attention_flops_per_token(work.length) * tokens / calib.attention_rate(work.length)
    # Elementwise work of the layers plus the loss's passes over [tokens, vocab] fp32 logits
    # (log-softmax: max, exp-sum, subtract, gather).
    elements = shape.layers * shape.elementwise_per_token() * DTYPE_BYTES[work.compute_dtype]
    elements += 4 * shape.vocab * 4
    traffic = elements * tokens / calib.bandwidth
    ops = (shape.layers * _OPS_PER_LAYER + _OPS_OUTSIDE) * work.grad_accum * calib.op_seconds
    if work.kind == "eval":
        return matmul + attn + traffic + ops
    passes = _LORA_PASSES if work.lora_rank else _FULL_PASSES
    recompute = 1.0 if work.grad_ckpt else 0.0
    adam = _ADAM_TOUCHES * _trainable(shape, work) / calib.bandwidth
    tensors = shape.large_tensors() if work.lora_rank is None else 1  # LoRA: the embedding
    adam += _ADAM_OPS_PER_TENSOR * tensors * calib.op_seconds
    return (
        matmul * (passes + recompute)
        + attn * (1 + _ATTN_BACKWARD + recompute)
        + traffic * (1 + _BACKWARD_ELEMENTWISE + recompute)
        + ops * (1 + _BACKWARD_OPS + recompute)
        + adam
    )


def _matmul_seconds(shape: ModelShape, calib: Calibration) -> float:
    """Forward seconds per token: each projection at the throughput of its size."""
    per_layer = sum(2.0 * a * b / calib.rate(math.sqrt(a * b)) for a, b in shape.linears())
    head = 2.0 * shape.hidden * shape.vocab / calib.rate(math.sqrt(shape.hidden * shape.vocab))
    return shape.layers * per_layer + head


# --------------------------------------------------------------------------- suggestions


def suggest_changes(
    shape: ModelShape, work: Workload, calib: Calibration, limit: int, trained_length: int
) -> list[str]:
    """The cheapest changes (fewest, least intrusive first) whose estimate fits in ``limit``.

    Order of preference: gradient checkpointing (same result, ~1/3 slower), LoRA (fewer
    trainable weights), a PoSE window of the trained length (same target, shorter sequences),
    --device-map auto (eval on a GPU), and last a shorter length (a different run).
    """
    options: list[tuple[str, Workload]] = []
    if work.kind == "finetune":
        if not work.grad_ckpt:
            options.append(("--grad-ckpt", replace(work, grad_ckpt=True)))
        if work.lora_rank is None:
            options.append(("--lora-rank 16", replace(work, lora_rank=16)))
        if work.length > trained_length:
            window = replace(work, length=trained_length)
            options.append((f"--pose --train-length {trained_length}", window))
    elif not work.device_map_auto and not calib.device.startswith("cpu"):
        options.append(("--device-map auto", replace(work, device_map_auto=True)))

    def fits(w: Workload) -> bool:
        return estimate(shape, w, calib).peak <= limit

    found = [name for name, w in options if fits(w)]
    if not found:  # two changes together
        for i, (a, wa) in enumerate(options):
            for b, wb in options[i + 1 :]:
                if fits(_combine(work, wa, wb)):
                    found.append(f"{a} {b}")
    if not found and len(options) == 3 and fits(_combine(work, *(w for _, w in options))):
        found.append(" ".join(name for name, _ in options))
    shorter = _longest_fitting(work, fits)
    if shorter is not None:
        flag = "--lengths" if work.kind == "eval" else "--target-length"
        found.append(f"{flag} {shorter}")
    return found[:3]


def _combine(base: Workload, *changed: Workload) -> Workload:
    """``base`` with every field that any of ``changed`` sets differently."""
    out = base
    for w in changed:
        diff = {k: v for k, v in asdict(w).items() if asdict(base)[k] != v}
        out = replace(out, **diff)
    return out


def _longest_fitting(work: Workload, fits: Any) -> int | None:
    """The longest power-of-two-halved length (>= 256) that fits, if any shorter one does."""
    length = work.length // 2
    while length >= 256:
        if fits(replace(work, length=length)):
            return length
        length //= 2
    return None


# --------------------------------------------------------------------------- units


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; binary units, three significant figures."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9}
_UNITS |= {"t": 1e12, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'512MB', '2GiB', '1e9', '80 GB' -> bytes; ValueError on anything else."""
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num) :]
    if unit not in _UNITS or not num:
        raise ValueError(f"not a memory size: {text!r} (e.g. 512MB, 2GiB, 80GB)")
    value = float(num) * _UNITS[unit]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"not a memory size: {text!r} (e.g. 512MB, 2GiB, 80GB)")
    return int(value)
