"""Peak memory of a workload, by component, from the model's shape and the run's settings.

The memory model counts what PyTorch keeps alive at the peak of a step, per component:

* weights: every parameter in its storage dtype (LoRA: the frozen base in the compute dtype,
  adapters and the LongLoRA-trainable embeddings/norms in fp32);
* optimizer: AdamW's two fp32 moments per trainable parameter (created at the first step);
* gradients: one fp32 gradient per trainable parameter;
* activations: the tensors autograd saves for the backward pass, counted per token per layer
  from a Llama-style decoder (see
  :meth:`~ctxext.resources.shape.ModelShape.saved_per_token`); with gradient checkpointing only each
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

from ctxext.finetune.episodes import mask_bytes
from ctxext.resources.shape import DTYPE_BYTES, ModelShape, Workload, trainable_params

#: Positions per chunk of eval's loss: the same rule as evaluate.default_chunk_size (256 MiB
#: of fp32 logits, counted twice), restated here so that planning imports no torch.
_LOGITS_BUDGET_BYTES = 256 * 2**20
#: AdamW moments (exp_avg, exp_avg_sq) per trainable parameter, fp32.
ADAM_BYTES = 8
#: fp32 logits, their log-softmax and its gradient exist together when the backward starts.
_TRAIN_LOSS_COPIES = 3


def weights_bytes(shape: ModelShape, work: Workload) -> int:
    base = shape.total_params() * DTYPE_BYTES[work.weight_dtype]
    if work.kind == "eval" or work.lora_rank is None:
        return base
    # LoRA adapters and the parts LongLoRA trains are fp32 whatever the base dtype is.
    fp32_extra = trainable_params(shape, work) * 4
    upcast = (trainable_params(shape, work) - shape.lora_params(work.lora_rank)) * (
        DTYPE_BYTES[work.weight_dtype]
    )
    return base + fp32_extra - upcast


def activation_bytes(shape: ModelShape, work: Workload, ckpt: bool) -> int:
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


def attention_bytes(shape: ModelShape, work: Workload) -> int:
    # Fused SDPA keeps a fp32 log-sum-exp per head per token for the backward; eval keeps none.
    if work.kind == "eval":
        return 0
    lse = shape.layers * shape.heads * work.length * work.batch * 4
    if not work.episodes:
        return lse
    return lse + mask_bytes(work.batch, work.length, DTYPE_BYTES[work.compute_dtype])


def loss_bytes(shape: ModelShape, work: Workload) -> int:
    tokens = work.length * work.batch
    if work.kind == "eval":
        chunk = max(16, _LOGITS_BUDGET_BYTES // (shape.vocab * 4 * 2))
        return 2 * min(chunk, work.length) * shape.vocab * 4
    return _TRAIN_LOSS_COPIES * tokens * shape.vocab * 4
