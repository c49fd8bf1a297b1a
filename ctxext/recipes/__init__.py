"""Recipes: one YAML file reproduces a whole extend -> fine-tune -> eval run.

A recipe holds the same typed sections the single commands build from their flags
(:class:`~ctxext.config.ExtendConfig`, :class:`~ctxext.config.FinetuneConfig`,
:class:`~ctxext.config.EvalConfig`), so a recipe says nothing the commands cannot and the other
way round. ``ctxext run RECIPE [key.sub=value ...]`` loads it (``yaml.safe_load`` semantics,
keys tracked to their line), applies the overrides, validates everything (unknown keys are
errors) and only then runs:

1. preflight: the model is resolved and the extension checked against its config; the output
   folder is checked (refused if it exists, unless ``overwrite``);
2. the checkpoint (``output_dir/model``): ``extend`` alone writes the extended checkpoint
   (config-only); with ``finetune`` the fine-tuned, merged checkpoint;
3. evaluation of the variants ``eval.compare`` names (base, extended, finetuned, other scaling
   methods applied in memory, or other checkpoints), side by side, with the same data;
4. outputs: ``recipe.yaml`` (resolved, after overrides, every default written out),
   ``results.json`` (with provenance), ``results.csv``, the plots, ``report.md`` and the model
   card ``model/README.md``.

Everything is built in a temporary sibling of ``output_dir`` and renamed into place at the end,
so a failed or interrupted run leaves nothing half-written. The recipe seed seeds Python,
NumPy and torch (and is the default seed of the fine-tune and eval sections), so re-running a
recipe on the same CPU reproduces results.json's numbers exactly.

Modules: :mod:`~ctxext.recipes.schema` (the typed recipe), :mod:`~ctxext.recipes.loader`
(YAML with line numbers, overrides, shipped recipes), :mod:`~ctxext.recipes.runner` (the
stages), :mod:`~ctxext.recipes.provenance` (hashes, versions, model-card data) and
:mod:`~ctxext.recipes.render` (report.md). The shipped recipes are the ``*.yaml`` files of this
folder. No module of this package imports torch at import time (the CLI's ``--help`` stays
instant).
"""
