"""`ctxext inspect`: what positional scheme a checkpoint uses and what scaling would do to it."""

from __future__ import annotations

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
    return report


def render_inspect(report: dict[str, Any], console: Any) -> None:
    """Rich rendering of :func:`inspect_model`'s report."""
    from rich.table import Table

    head = Table(title=f"{report['model']}", show_header=False)
    head.add_column("key", style="bold")
    head.add_column("value")
    for key, value in report.items():
        if key not in ("pairs", "model"):
            head.add_row(key, _fmt(value))
    console.print(head)
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
