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
        title=f"dimension pairs: wavelength vs trained length, and at {report['target_length']}"
    )
    for col in pairs[0]:
        table.add_column(col, justify="right")
    for row in pairs:
        table.add_row(*(_fmt(v) for v in row.values()))
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
