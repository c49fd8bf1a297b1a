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
