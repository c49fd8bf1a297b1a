"""The `ctxext` command line: one module per command (parse -> call -> render).

:mod:`ctxext.cli.app` holds the Typer app and :func:`main` (the console entry point
``ctxext = ctxext.cli:main``); heavy libraries (torch, transformers) are imported inside the
commands so that `ctxext --help` is instant.
"""

from ctxext.cli.app import main

__all__ = ["main"]
