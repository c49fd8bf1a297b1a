"""A scaled config's rope as the model was trained with it: the reference of the effective-length
rule scores a checkpoint's own weights with its original rope (ctxext.evaluate.reference)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from ctxext.rope.read import analyze, rope_entries

#: Scalings whose original rope a config does not record: static NTK ("default" with an
#: enlarged theta, the original theta not kept) and longrope (its short factors are part of the
#: trained rope, at every length).
_NOT_RECORDED = ("default", "longrope")


def original_config(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """``config`` with its rope as trained: every rope entry ``default`` with its own theta (and
    rotary share), no legacy ``rope_scaling``, ``max_position_embeddings`` the trained length.

    A config without rope scaling (or without rope) comes back unchanged. None where the
    original is not recorded (static NTK: theta was rewritten; longrope: see ``_NOT_RECORDED``).
    """
    info = analyze(config)
    out = copy.deepcopy(dict(config))
    if info.scheme != "rope" or info.existing_scaling is None:
        return out
    if info.existing_scaling["rope_type"] in _NOT_RECORDED:
        return None
    root = out
    for key in info.config_path:
        root = root[key]
    entries = {
        layer: {
            "rope_type": "default",
            "rope_theta": float(entry["rope_theta"]),
            **(
                {"partial_rotary_factor": entry["partial_rotary_factor"]}
                if "partial_rotary_factor" in entry
                else {}
            ),
        }
        for layer, entry in rope_entries(info.model_type, root).items()
    }
    root["rope_parameters"] = entries.get(None, entries)
    if "rope_scaling" in root:
        root["rope_scaling"] = None
    root["max_position_embeddings"] = int(info.trained_length)
    root.pop("original_max_position_embeddings", None)
    return out
