"""Errors the user can act on.

Lower modules raise these; only the CLI turns them into a one-line message and an exit code.
"""

from __future__ import annotations


class CtxextError(Exception):
    """Bad input: the CLI prints ``error: <message>`` on one line and exits with ``exit_code``.

    The message must name the problem *and* what to do about it.
    """

    exit_code = 2


class ResourceError(CtxextError):
    """The environment failed us (disk full, permission lost mid-write): exit code 1."""

    exit_code = 1
