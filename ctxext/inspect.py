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
    """Rich rendering of :func:`inspect_model`'s report; readable at 80 columns."""
    from rich import box
    from rich.table import Table

    head = Table(title=f"{report['model']}", show_header=False, box=box.SIMPLE)
    head.add_column("key", style="bold", no_wrap=True)
    head.add_column("value", overflow="fold")
    for key, value in report.items():
        if key not in ("pairs", "model"):
            head.add_row(key, _fmt(value))
    console.print(head)
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
