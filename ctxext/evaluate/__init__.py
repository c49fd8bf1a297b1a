"""Evaluation of a causal LM at long contexts: every task of ``ctxext eval`` and the run.

* :mod:`~ctxext.evaluate.run`: the ``ctxext eval`` pipeline (checks, tokenizing, every
  variant through every task, the results document); :mod:`~ctxext.evaluate.variants`: the
  rows (checkpoint x scaling method).
* :mod:`~ctxext.evaluate.loss`: the chunked loss through the LM head (never ``[length x
  vocab]`` logits) and the rotary state between passes.
* :mod:`~ctxext.evaluate.protocol`: tokens and their bytes, which documents and windows are
  scored at each length, and the ``protocol`` dict every perplexity result carries.
* :mod:`~ctxext.evaluate.perplexity`: perplexity, bits per byte, position buckets and the
  bootstrap interval over a sweep of lengths.
* :mod:`~ctxext.evaluate.context_use`: the far-context gain (does the model use the far text);
  :mod:`~ctxext.evaluate.longppl`: LongPPL's key tokens and the reference's short pass (also
  LongCE's); :mod:`~ctxext.evaluate.run_context`: both tasks as the run calls them.
* :mod:`~ctxext.evaluate.needles`: retrieval templates (train and held-out forms) and their
  prompts; :mod:`~ctxext.evaluate.passkey`: the natural-language passkey (Mohtashami & Jaggi
  2023); :mod:`~ctxext.evaluate.scoring`: teacher-forced answer scoring and the result type;
  :mod:`~ctxext.evaluate.retrieval`: the retrieval task.
* :mod:`~ctxext.evaluate.effective_length`: the effective context length.

This package module imports nothing (``needles`` is read by the config layer, which loads no
torch): import from the submodules.
"""
