"""Time of a workload: FLOPs at the device's measured throughput, elementwise traffic at its
measured bandwidth, kernel launches at its measured latency (:class:`Calibration`, measured by
:mod:`ctxext.resources.calibrate`). Pure: no torch."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from ctxext.resources.shape import DTYPE_BYTES, ModelShape, Workload, trainable_params

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
#: A training step's backward moves about twice the forward's elementwise traffic, in about
#: as many kernels (autograd's elementwise gradients come fused in fewer, larger kernels).
_BACKWARD_ELEMENTWISE, _BACKWARD_OPS = 2.0, 1.0


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


def step_seconds(shape: ModelShape, work: Workload, calib: Calibration) -> float:
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
    adam = _ADAM_TOUCHES * trainable_params(shape, work) / calib.bandwidth
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
