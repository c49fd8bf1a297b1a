"""RoPE configs: read one the way transformers reads it, and rewrite it for a longer context.

Pure functions on plain dicts (a parsed ``config.json``); no model, no torch.

* :mod:`~ctxext.rope.methods`: the scaling methods and their options with defaults (the one
  definition of each; config, CLI, recipes, tune and the writers read them from there).
* :mod:`~ctxext.rope.read`: which position encoding a config uses, its theta, rotary
  dimension and trained length (:func:`analyze` -> :class:`RopeInfo`), or why nothing applies.
* :mod:`~ctxext.rope.write`: check a request and write the extended config
  (:func:`extend_config`, one writer and one option validator per method), the one new-length
  rule (:func:`new_length`) and the dry-run diff.
* :mod:`~ctxext.rope.original`: a scaled config's rope as trained (:func:`original_config`).
* :mod:`~ctxext.rope.formulas`: the papers' frequency formulas in float64 (numpy, loaded on
  use): the static NTK theta, ``ctxext inspect``'s per-pair table and tune's per-pair view are
  computed with them, and the exactness tests compare transformers' own maths against them.

How transformers 5.x reads what we write (``modeling_rope_utils.py`` and the config classes):

* ``rope_parameters`` is the v5 home: ``{rope_type, rope_theta, factor, ...}``.
* A legacy ``rope_scaling`` key, when truthy, REPLACES ``rope_parameters`` wholesale on load
  (``rope_scaling or rope_parameters``); the top-level ``rope_theta`` / ``partial_rotary_factor``
  are then only ``setdefault``-ed into it. Our mirror holds the scaling keys only (transformers
  4.x warns about ``rope_theta`` or ``partial_rotary_factor`` inside ``rope_scaling`` on every
  load), so the top-level copies are always rewritten: a stale one would change theta.
* GPT-NeoX reads theta from ``rotary_emb_base`` and the rotary share from ``rotary_pct``
  (default 0.25), never from top-level ``rope_theta``.
* Gemma 3 nests ``{sliding_attention: {...}, full_attention: {...}}``; a legacy ``rope_scaling``
  is merged (``dict.update``) into ``full_attention`` only; top-level ``rope_theta`` feeds
  full_attention and ``rope_local_base_freq`` feeds sliding_attention.
* Each rope_type has a validator that warns about keys it does not know: ``default`` accepts only
  ``rope_theta``/``partial_rotary_factor``, ``linear`` and ``dynamic`` add ``factor``. So the
  trained length goes into ``rope_parameters`` only for ``yarn`` and ``llama3`` (which require
  it) and at the top level (``original_max_position_embeddings``) always; for flat configs
  transformers prefers that top-level value for yarn/llama3/longrope, so both must agree.
* YaRN reads ``truncate`` from the top of ``rope_parameters``, so inside a nested (Gemma 3)
  entry it is ignored; we never write it (the default, floor/ceil, is the paper's code).
* There is no ``ntk`` rope_type (it loads with a warning, then the model fails to build): static
  NTK is written as ``rope_type: default`` with the enlarged theta.
"""

from ctxext.rope.methods import (
    ALL_METHODS,
    ENGINE_WARNINGS,
    FACTOR_LIST_METHODS,
    METHODS,
    OPTION_DEFAULTS,
    OPTIONS_OF,
)
from ctxext.rope.original import original_config
from ctxext.rope.read import RopeInfo, analyze
from ctxext.rope.write import config_diff, extend_config, new_length, validate_request

__all__ = [
    "ALL_METHODS",
    "ENGINE_WARNINGS",
    "FACTOR_LIST_METHODS",
    "METHODS",
    "OPTIONS_OF",
    "OPTION_DEFAULTS",
    "RopeInfo",
    "analyze",
    "config_diff",
    "extend_config",
    "new_length",
    "original_config",
    "validate_request",
]
