"""`ctxext inspect`: what positional scheme a checkpoint uses and what scaling would do to it."""

from __future__ import annotations

import math
from typing import Any

from ctxext import checkpoint, rope


def inspect_model(model: str | None, target_length: int | None = None) -> dict[str, Any]:
    """A JSON-serialisable report: scheme, rope parameters and, for RoPE, the per-pair view."""
    source = checkpoint.resolve_model(model)
    config = checkpoint.read_config(source.path)
    info = rope.analyze(config)
    report: dict[str, Any] = {"model": source.name, "path": str(source.path)}
    report.update(rope.summarize(info))
    if info.scheme != "rope":
        return report
    if target_length is None:
        target_length = info.trained_length * 4
    elif target_length <= 0:
        from ctxext.errors import CtxextError

        raise CtxextError(f"--target-length must be a positive integer (got {target_length})")
    report["target_length"] = target_length
    report["pairs"] = rope.pair_table(info, target_length)
    report["longrope"] = longrope_rows(info)
    return report


def longrope_rows(info: rope.RopeInfo) -> list[dict[str, Any]] | None:
    """For a longrope config: each pair's short and long factor and what they do to it."""
    existing = info.existing_scaling or {}
    if existing.get("rope_type") != "longrope":
        return None
    from ctxext.rope_reference import default_inv_freq

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


def render_inspect(report: dict[str, Any], console: Any) -> None:
    """Rich rendering of :func:`inspect_model`'s report."""
    from rich.table import Table

    head = Table(title=f"{report['model']}", show_header=False)
    head.add_column("key", style="bold")
    head.add_column("value")
    for key, value in report.items():
        if key not in ("pairs", "model", "longrope"):
            head.add_row(key, _fmt(_without_lists(value) if key == "existing_scaling" else value))
    console.print(head)
    if report.get("longrope"):
        console.print(_longrope_table(report["longrope"]))
    pairs = report.get("pairs")
    if not pairs:
        return
    table = Table(
        title=f"dimension pairs: wavelength vs trained length {report['trained_length']}, "
        f"and what each method does at {report['target_length']}",
        caption="stretch = new wavelength / old; I = interpolated, E = extrapolated (kept), "
        "B = blended",
    )
    for col in ("pair", "wavelength", "turns in training", "full turn"):
        table.add_column(col, justify="right")
    methods = list(pairs[0]["methods"])
    for m in methods:
        table.add_column(m, justify="right")
    for row in pairs:
        cells = [
            str(row["pair"]),
            _fmt(row["wavelength"]),
            _fmt(row["turns_in_trained"]),
            "yes" if row["completes_turn"] else "[red]never[/red]",
        ]
        for m in methods:
            cell = row["methods"][m]
            cells.append(f"x{cell['stretch']:.3g} {cell['regime'][0].upper()}")
        table.add_row(*cells)
    console.print(table)


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
