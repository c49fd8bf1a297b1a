"""The scaling methods ctxext writes and their options: the one definition of each.

``config.Method`` (the schema), the CLI, recipes, tune and the writers in
:mod:`ctxext.rope.write` all read these; :mod:`ctxext.rope.formulas` takes its defaults from
here too.
"""

from __future__ import annotations

from typing import Any

#: Methods defined by a factor (and optional hyperparameters), in the order tables list them.
METHODS = ("linear", "ntk", "yarn", "dynamic", "llama3")
#: Methods that need more than a factor: longrope takes searched (or given) per-pair factors.
FACTOR_LIST_METHODS = ("longrope",)
ALL_METHODS = METHODS + FACTOR_LIST_METHODS
#: Methods whose frequencies do not depend on the sequence length: what ``keep_short`` can
#: write as longrope long factors (dynamic and longrope set their short mode themselves).
KEEP_SHORT_METHODS = tuple(m for m in METHODS if m != "dynamic")

#: Every method option and its default (the papers' values; None: derived from s, or absent).
OPTION_DEFAULTS: dict[str, Any] = {
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "attention_factor": None,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "theta_multiplier": None,
    "long_factor": None,
    "short_factor": None,
}
#: The options each method reads (a changed option of another method is an error).
OPTIONS_OF: dict[str, tuple[str, ...]] = {
    "linear": (),
    "ntk": ("theta_multiplier",),
    "dynamic": (),
    "yarn": ("beta_fast", "beta_slow", "attention_factor"),
    "llama3": ("low_freq_factor", "high_freq_factor"),
    "longrope": ("long_factor", "short_factor", "attention_factor"),
}

#: What engines other than transformers do instead with a method (keyed by method) or with
#: options changed from their defaults (keyed by (method, option names)); `ctxext extend` prints
#: it. Read in their source: llama.cpp's convert_hf_to_gguf.py writes nothing for
#: ``rope_type == "dynamic"`` (tests/test_gguf_interop.py runs it), and its src/llama-model.cpp
#: reads the YaRN betas and attention factor back for Grok and Mistral 3 only; vLLM's
#: DynamicNTKScalingRotaryEmbedding computes one base for the longest servable length; TGI's
#: DynamicPositionRotaryEmbedding recomputes only when a longer batch arrives, and its YaRN
#: hard-codes betas 32/1 and the 0.1 ln s + 1 attention factor.
ENGINE_WARNINGS: dict[str | tuple[str, tuple[str, ...]], str] = {
    "dynamic": (
        "only transformers rescales dynamic per sequence: llama.cpp ignores it (its GGUF says no "
        "rope scaling and a {trained}-token context), vLLM gives every sequence the base "
        "transformers uses at {new} tokens, TGI keeps the base of the longest batch it has seen; "
        "for the same model in every engine use yarn, linear, ntk or llama3"
    ),
    ("yarn", ("beta_fast", "beta_slow", "attention_factor")): (
        "llama.cpp (Llama models) and TGI ignore {changed}: they run YaRN with beta_fast 32, "
        "beta_slow 1 and attention factor 0.1 ln s + 1"
    ),
}
