"""Small wording helpers shared by messages, tables and reports."""

from __future__ import annotations


def plural(n: int, noun: str, many: str | None = None) -> str:
    """``1 sequence``, ``2 sequences``; ``many`` for irregular plurals (``process(es)``)."""
    return f"{n:,} {noun if n == 1 else many or noun + 's'}"


__all__ = ["plural"]
