"""`ctxext inspect`: what positional scheme a checkpoint uses and what scaling would do to it."""

from __future__ import annotations

import math
import re
from typing import Any

from ctxext import checkpoint, locate, rope
from ctxext.errors import CtxextError
from ctxext.rope.methods import METHODS
from ctxext.rope.write import check_factor


def inspect_model(model: str | None, target_length: int | None = None) -> dict[str, Any]:
    """A JSON-serialisable report: scheme, rope parameters and, for RoPE, the per-pair view."""
    source = locate.resolve_model(model)
    config = checkpoint.read_config(source.path)
    info = rope.analyze(config)
    report: dict[str, Any] = {"model": source.name, "path": str(source.path)}
    if source.commit is not None:  # a Hub model: the commit its files came from
        report["revision"] = f"{source.revision or 'main'} @ {source.commit}"
    report.update(summarize(info))
    if info.scheme != "rope":
        return report
    if target_length is None:
        target_length = info.trained_length * 4
    elif target_length <= 0:
        raise CtxextError(f"--target-length must be a positive integer (got {target_length})")
    report["target_length"] = target_length
    window = rope.read.sliding_window(config, target_length)
    if window is not None:
        report["sliding_window"] = window["note"]
    report["pairs"] = pair_table(info, target_length)
    report["longrope"] = longrope_rows(info)
    return report


def longrope_rows(info: rope.RopeInfo) -> list[dict[str, Any]] | None:
    """For a longrope config: each pair's short and long factor and what they do to it."""
    existing = info.existing_scaling or {}
    if existing.get("rope_type") != "longrope":
        return None
    from ctxext.rope.formulas import default_inv_freq

    wavelengths = 2 * math.pi / default_inv_freq(info.rope_theta, info.rotary_dim)
    pairs = zip(wavelengths, existing["short_factor"], existing["long_factor"], strict=True)
    return [
        {
            "pair": j,
            "wavelength": float(w),
            "short_factor": float(short),
            "long_factor": float(long),
            "long_wavelength": float(w * long),
            "turns_in_trained": info.trained_length / float(w),
        }
        for j, (w, short, long) in enumerate(pairs)
    ]


def _require_rope(info: rope.RopeInfo) -> None:
    if info.scheme != "rope" or info.rotary_dim < 4:
        raise CtxextError(
            info.refusal or f"model_type '{info.model_type}' has no usable RoPE to inspect"
        )


def _regime(stretch: float, s: float) -> str:
    """How a pair's wavelength changed: kept (extrapolated), x s (interpolated), or between."""
    if math.isclose(stretch, 1.0, rel_tol=1e-9):
        return "extrapolated"
    if math.isclose(stretch, s, rel_tol=1e-9):
        return "interpolated"
    return "blended"


def pair_table(
    info: rope.RopeInfo,
    target_length: int,
    methods: tuple[str, ...] | list[str] = METHODS,
    factor: float | None = None,
) -> list[dict]:
    """One row per rotary pair: wavelength, turns within training, and each method's effect.

    ``factor`` defaults to target_length / trained_length. Each row's ``methods[m]`` holds the new
    wavelength, its stretch (new / old), turns within the target length and a regime:
    "extrapolated" (unchanged), "interpolated" (x s) or "blended"; yarn and llama3 also give
    ``ramp`` (their interpolation weight, 0 = kept, 1 = divided by s). Dynamic is shown at
    seq_len = target_length.
    """
    _require_rope(info)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise CtxextError(f"unknown method {unknown[0]!r}: choose from {', '.join(METHODS)}")
    s = check_factor(factor) if factor is not None else target_length / info.trained_length
    if factor is None and target_length <= info.trained_length:
        raise CtxextError(
            f"target length {target_length} is not longer than the trained length "
            f"{info.trained_length}: pass a larger target length"
        )
    from ctxext.rope import formulas

    theta, d, length = info.rope_theta, info.rotary_dim, info.trained_length
    base = formulas.default_inv_freq(theta, d)
    ramps = {
        "yarn": formulas.yarn_ramp(theta, d, length),
        "llama3": formulas.llama3_blend(theta, d, length),
    }
    scaled = {
        m: formulas.reference_inv_freq(
            m, theta, d, s, length, seq_len=target_length if m == "dynamic" else None
        )[0]
        for m in methods
    }
    rows = []
    for j, inv in enumerate(base):
        wavelength = 2 * math.pi / float(inv)
        row: dict[str, Any] = {
            "pair": j,
            "inv_freq": float(inv),
            "wavelength": wavelength,
            "turns_in_trained": length / wavelength,
            "completes_turn": bool(wavelength <= length),
            "methods": {},
        }
        for m in methods:
            new_wavelength = 2 * math.pi / float(scaled[m][j])
            stretch = new_wavelength / wavelength
            cell = {
                "wavelength": new_wavelength,
                "stretch": stretch,
                "turns_at_target": target_length / new_wavelength,
                "regime": _regime(stretch, s),
            }
            if m in ramps:
                cell["ramp"] = float(ramps[m][j])
            row["methods"][m] = cell
        rows.append(row)
    return rows


def summarize(info: rope.RopeInfo) -> dict:
    """JSON-ready summary for ``ctxext inspect``: scheme, theta, dims, lengths, turn counts."""
    out: dict[str, Any] = {
        "model_type": info.model_type,
        "scheme": info.scheme,
        "rope_theta": info.rope_theta,
        "head_dim": info.head_dim,
        "rotary_dim": info.rotary_dim,
        "partial_rotary_factor": info.partial_rotary_factor,
        "trained_length": info.trained_length,
        "max_position_embeddings": info.max_position_embeddings,
        "layer_types": list(info.layer_types) if info.layer_types else None,
        "sliding_rope_theta": info.sliding_rope_theta,
        "existing_scaling": info.existing_scaling,
        "allowed_methods": list(info.allowed_methods),
        "refusal": info.refusal,
        "pairs": None,
        "pairs_completing_turn": None,
        "pairs_never_completing_turn": None,
    }
    if info.scheme == "rope" and info.rotary_dim >= 4 and info.rotary_dim % 2 == 0:
        from ctxext.rope.formulas import default_inv_freq

        wavelengths = 2 * math.pi / default_inv_freq(info.rope_theta, info.rotary_dim)
        complete = int((wavelengths <= info.trained_length).sum())
        out["pairs"] = info.rotary_dim // 2
        out["pairs_completing_turn"] = complete
        out["pairs_never_completing_turn"] = info.rotary_dim // 2 - complete
    return out


def render_inspect(report: dict[str, Any], console: Any) -> None:
    """Rich rendering of :func:`inspect_model`'s report; readable at 80 columns."""
    from rich import box
    from rich.table import Table

    title = fold_path(str(report["model"]), console.width - 2)
    head = Table(title=title, show_header=False, box=box.SIMPLE)
    head.add_column("key", style="bold", no_wrap=True)
    head.add_column("value", overflow="fold")
    rows = [(k, v) for k, v in report.items() if k not in ("pairs", "model", "longrope")]
    room = console.width - max(len(k) for k, _ in rows) - 8  # the value column's width
    for key, value in rows:
        if key == "path":  # broken after a "/", never inside a name
            head.add_row(key, fold_path(str(value), room))
        else:
            head.add_row(key, _fmt(_without_lists(value) if key == "existing_scaling" else value))
    console.print(head)
    if report.get("longrope"):
        console.print(_longrope_table(report["longrope"]))
    pairs = report.get("pairs")
    if not pairs:
        return
    # One line per pair: short headers, one "x<stretch> <regime letter>" cell per method.
    table = Table(
        title=f"dimension pairs: trained length {report['trained_length']} -> "
        f"{report['target_length']}",
        caption="wavelength in tokens; turns = turns within the trained length (red: less than "
        "one full turn); per method: x stretch of the wavelength, I interpolated, E "
        "extrapolated (kept), B blended",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    methods = list(pairs[0]["methods"])
    for col in ("pair", "wave-\nlength", "turns", *methods):
        table.add_column(col, justify="right", overflow="fold")  # never cut a number
    for row in pairs:
        turns = _short_number(row["turns_in_trained"], 3)
        cells = [
            str(row["pair"]),
            _short_number(row["wavelength"]),
            turns if row["completes_turn"] else f"[red]{turns}[/red]",
        ]
        for m in methods:
            cell = row["methods"][m]
            cells.append(f"x{_short_number(cell['stretch'], 3)} {cell['regime'][0].upper()}")
        table.add_row(*cells)
    console.print(table)


def fold_path(path: str, width: int) -> str:
    """``path`` in lines of at most ``width`` characters, broken after a ``/`` (a name longer
    than a line is the only thing folded inside)."""
    lines, line = [], ""
    for part in re.split(r"(?<=/)", path):
        if line and len(line) + len(part) > width:
            lines.append(line)
            line = ""
        line += part
    return "\n".join([*lines, line])


def _without_lists(value: Any) -> Any:
    """The per-pair factor lists get their own table."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if not isinstance(v, list)}
    return value


def _longrope_table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(
        title="longrope factors: pair frequency / short_factor up to the trained length, "
        "/ long_factor beyond it",
    )
    for col in ("pair", "wavelength", "turns in training", "short", "long", "long wavelength"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["pair"]),
            _fmt(r["wavelength"]),
            _fmt(r["turns_in_trained"]),
            _fmt(r["short_factor"]),
            _fmt(r["long_factor"]),
            _fmt(r["long_wavelength"]),
        )
    return table


def _short_number(value: float, digits: int = 4) -> str:
    """``digits`` significant digits in at most 7 characters: 6.283, 0.00966, 4712, 1.99e4."""
    if 1e-3 <= abs(value) < 10**digits:
        return f"{value:.{digits}g}"
    text = f"{value:.{min(digits, 3) - 1}e}"  # e.g. 1.99e+04 -> 1.99e4, 9.7e-05 -> 9.7e-5
    return text.replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return "-" if value is None else str(value)
