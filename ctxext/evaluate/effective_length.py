"""Effective context length, RULER-style (Hsieh et al. 2024): retrieval is judged against what
the unscaled model retrieves in its own trained window, per family of templates.

For each retrieval family f (:func:`families`), the reference r_f is the unscaled model's
accuracy in f, pooled over its forms and depths, at its trained length
(:mod:`ctxext.evaluate.reference` measures it). f is judged iff r_f >= the floor
(``--effective-threshold``, default 0.5), against the threshold t_f = max(floor, 0.9 r_f). The
effective length is the longest evaluated length L such that at L and at every shorter evaluated
length every judged family's accuracy (pooled over its forms and depths) is >= t_f and, beyond
the local window, the far-context gain of the last position bucket is positive (its bootstrap
interval above 0). A family below the floor is reported, not judged: a model that cannot
retrieve a form in its own window says nothing about its extension. With no family judged the
gain alone decides; a task not run does not count against a length.

Every decision carries its counts (hits/n, Wilson 95% interval) and whether one key more or
less would flip it ("one key decides").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ctxext.evaluate.needles import TEMPLATES

if TYPE_CHECKING:  # annotations only: the rule needs no torch (preflight imports this module)
    from ctxext.evaluate.context_use import ContextUseResult
    from ctxext.evaluate.scoring import RetrievalResult

#: A judged family's threshold: max(floor, RELATIVE x the unscaled model's accuracy).
RELATIVE = 0.9
_Z95 = 1.959963984540054
_EPS = 1e-9  # 0.9 x 0.7 is 0.63 to a float's rounding: a tally exactly at a threshold passes


def rule_text(floor: float) -> str:
    """The rule in words, with the floor (results.json's protocol, the summary)."""
    return (
        "RULER-style, per retrieval family (held out: code-binding, code-question, prose; "
        "other template selections: the family of each template, training forms marked "
        "(train); the passkey text: one family): r = the unscaled model's accuracy in the "
        "family, pooled over its forms and depths, at its trained length (the longest "
        "evaluated length where that is shorter); a family is judged iff r >= the floor "
        f"{_pct(floor)}, against the threshold max(floor, {RELATIVE:g} r). Effective length: "
        "the longest evaluated length L such that at L and at every shorter evaluated length "
        "every judged family's accuracy (pooled over its forms and depths) reaches its "
        "threshold and, beyond the local window, the far-context gain of the last position "
        "bucket is positive (95% interval above 0). No family judged: the gain alone decides; "
        "a task not run does not count against a length"
    )


def _pct(x: float) -> str:
    return f"{x * 100:.3g}%"


def wilson(hits: int, n: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default); (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = hits / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    # At 0 (or n) hits the bound is exactly 0 (or 1): centre and half cancel there, and rounding
    # would leave a bound of ~1e-17 beyond the proportion itself.
    low = 0.0 if hits == 0 else max(0.0, (centre - half) / scale)
    high = 1.0 if hits == n else min(1.0, (centre + half) / scale)
    return low, high


@dataclass(frozen=True)
class Tally:
    """Correct answers out of n keys."""

    hits: int
    n: int

    @property
    def accuracy(self) -> float:
        return self.hits / self.n if self.n else 0.0

    def passes(self, threshold: float) -> bool:
        return self.n > 0 and self.hits >= threshold * self.n - _EPS

    def one_key_decides(self, threshold: float) -> bool:
        """Whether one key more (a failing tally) or less (a passing one) flips the verdict."""
        verdict = self.passes(threshold)
        hits = self.hits - 1 if verdict else self.hits + 1
        return 0 <= hits <= self.n and Tally(hits, self.n).passes(threshold) != verdict

    def to_dict(self) -> dict[str, Any]:
        low, high = wilson(self.hits, self.n)
        return {
            "hits": self.hits,
            "n": self.n,
            "accuracy": self.accuracy,
            "ci_low": low,
            "ci_high": high,
        }


def family_label(template: str) -> str:
    """The family a template is judged in: a held-out form's family; a training form's family
    marked ``(train)``; anything else (the passkey ``text``) its own."""
    t = TEMPLATES.get(template)
    if t is None:
        return template
    return t.family if t.split == "heldout" else f"{t.family} (train)"


def families(retrieval: RetrievalResult) -> dict[str, list[str]]:
    """Family -> its templates, in the result's template order. A result without per-template
    accuracies is one family (its template selection), pooled over every cell."""
    if not retrieval.by_template:
        return {retrieval.template or "passkey": []}
    out: dict[str, list[str]] = {}
    for name in retrieval.templates or list(retrieval.by_template):
        out.setdefault(family_label(name), []).append(name)
    return out


def tally(retrieval: RetrievalResult, templates: Sequence[str], length: int) -> Tally:
    """The keys of ``templates`` at ``length``, pooled over depths (every template's keys where
    ``templates`` is empty or the result has no per-template figures)."""
    i = retrieval.lengths.index(length)
    depths = len(retrieval.depths)
    if templates and all(t in retrieval.by_template for t in templates):
        per = retrieval.trials // max(1, len(retrieval.templates))
        hits = sum(round(a * per) for t in templates for a in retrieval.by_template[t][i])
        return Tally(hits, per * depths * len(templates))
    return Tally(sum(retrieval.correct[i]), retrieval.trials * depths)


@dataclass(frozen=True)
class Reference:
    """The unscaled model's retrieval per family at one length (its trained length)."""

    model: str
    length: int
    families: dict[str, Tally]
    source: str
    """Where the figures come from, in words (reused from a row, or scored for this)."""

    @classmethod
    def of(cls, retrieval: RetrievalResult, length: int, model: str, source: str) -> Reference:
        fams = families(retrieval)
        return cls(model, length, {f: tally(retrieval, t, length) for f, t in fams.items()}, source)


def judge(
    lengths: Sequence[int],
    retrieval: RetrievalResult | None,
    gains: dict[int, ContextUseResult] | None,
    reference: Reference | None,
    floor: float,
) -> dict[str, Any]:
    """The effective length and every decision behind it (results.json's
    ``effective_length_detail``; ``["effective_length"]`` is the length or None)."""
    gains = gains or {}
    fams = families(retrieval) if retrieval is not None else {}
    judged = {f: _family(f, names, reference, floor) for f, names in fams.items()}
    thresholds = {f: j["threshold"] for f, j in judged.items() if j["counted"]}
    basis = (["retrieval"] if thresholds else []) + (["far-context gain"] if gains else [])
    per_length: dict[str, Any] = {}
    best = failed_at = None
    for n in sorted(lengths):
        entry: dict[str, Any] = {}
        reasons: list[str] = []
        if retrieval is not None and n in retrieval.lengths:
            entry["families"] = {}
            for f, names in fams.items():
                t = tally(retrieval, names, n)
                cell = entry["families"][f] = t.to_dict()
                if f in thresholds:
                    ok = t.passes(thresholds[f])
                    cell.update(passes=ok, one_key_decides=t.one_key_decides(thresholds[f]))
                    if not ok:
                        reasons.append(f"{f} {t.accuracy:.0%} < {_pct(thresholds[f])}")
        gain = gains.get(n)
        if gain is not None and n > gain.window:
            last = gain.last_bucket
            ok = last["ci_low"] > 0
            entry["gain"] = {k: last[k] for k in ("gain_bits", "ci_low", "ci_high")}
            entry["gain"]["passes"] = ok
            if not ok:
                reasons.append("far-context gain's interval not above 0")
        cells = entry.get("families", {}).values()
        entry["one_key_decides"] = any(c.get("one_key_decides") for c in cells)
        entry["passes"] = not reasons
        entry["counts"] = bool(basis) and not reasons and failed_at is None
        if entry["counts"]:
            best = n
            entry["decision"] = "counts"
        elif not basis:
            entry["decision"] = "not judged: no retrieval family judged, no far-context gain"
        elif reasons:
            entry["decision"] = "fails: " + "; ".join(reasons)
        else:
            entry["decision"] = f"passes, but {failed_at} failed"
        if reasons and failed_at is None:
            failed_at = n
        per_length[str(n)] = entry
    return {
        "effective_length": best,
        "floor": floor,
        "relative": RELATIVE,
        "basis": basis,
        "retrieval_judged": bool(thresholds),
        "reference": None
        if reference is None
        else {"model": reference.model, "length": reference.length, "source": reference.source},
        "families": judged,
        "lengths": per_length,
    }


def _family(
    family: str, templates: list[str], reference: Reference | None, floor: float
) -> dict[str, Any]:
    ref = reference.families.get(family) if reference is not None else None
    out: dict[str, Any] = {"templates": templates, "reference": None, "counted": False}
    if ref is None or reference is None:
        why = "no reference" if reference is None else f"no reference: {reference.source}"
        return {**out, "threshold": None, "one_key_decides": False, "note": f"not judged: {why}"}
    counted = ref.passes(floor)
    threshold = max(floor, RELATIVE * ref.accuracy) if counted else None
    where = f"the unscaled model retrieves {ref.accuracy:.0%} at {reference.length}"
    note = (
        f"judged: {where}; threshold max({_pct(floor)}, {RELATIVE:g} x {ref.accuracy:.0%})"
        if counted
        else f"not judged: {where}, below the floor {_pct(floor)}"
    )
    return {
        **out,
        "reference": ref.to_dict(),
        "counted": counted,
        "threshold": threshold,
        "one_key_decides": ref.one_key_decides(floor),
        "note": note,
    }


def effective_length(
    lengths: Sequence[int],
    retrieval: RetrievalResult | None,
    gains: dict[int, ContextUseResult] | None,
    reference: Reference | None,
    floor: float,
) -> int | None:
    """The longest length :func:`judge` finds (None: none, or nothing judged)."""
    return judge(lengths, retrieval, gains, reference, floor)["effective_length"]


def context_length(info: Any) -> int:
    """The length a variant's config claims (``info``: its ``rope.analyze``): the trained length
    times its scaling factor."""
    from ctxext import rope

    factor = float((info.existing_scaling or {}).get("factor") or 1.0)
    if factor <= 1.0:
        return info.max_position_embeddings
    return max(info.max_position_embeddings, rope.new_length(info.trained_length, factor))
