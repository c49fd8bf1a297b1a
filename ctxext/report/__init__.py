"""Rendering results, one module per output: :mod:`~ctxext.report.tables` (Rich tables for the
terminal), :mod:`~ctxext.report.files` (results.json, results.csv and the output folder),
:mod:`~ctxext.report.plots` (the terminal curve and PNG figures) and
:mod:`~ctxext.report.markdown` (report.md, model cards, leaderboards);
:mod:`~ctxext.report.cells` is what they share (the metric, curves and table cells)."""
