"""`ctxext tune`: search each scaling method's hyperparameters on held-out perplexity.

* :mod:`~ctxext.tune.search`: candidates, LongRoPE factors, scoring on one loaded model, successive
  halving, the evolutionary search and the budget allocation.
* :mod:`~ctxext.tune.leaderboard`: every row measured on the report documents, ranked, and the
  recipe that reproduces the winner (the Markdown table and plot are in :mod:`ctxext.report`).
* :mod:`~ctxext.tune.run`: the cheap checks, the document split, the pipeline and the output
  folder.

Protocol (every number in the output says which documents it comes from):

* The data's documents with at least ``target_length`` tokens are shuffled with the seed and
  split into a *search* set (the search sees only these) and a disjoint *report* set (the
  leaderboard is measured only on these). Both lists of names go into ``tune.json``.
* A candidate is a method plus hyperparameters, applied in memory: the config dict is
  rewritten by :func:`ctxext.rope.extend_config` (as `extend` writes it) and only the model's
  rotary embedding modules are rebuilt from it, so scoring a candidate and loading the written
  checkpoint run the same maths.
* Score: token-weighted perplexity at ``target_length`` (``evaluate_perplexity``'s truncate
  protocol: each document's first N tokens). Guard: perplexity at the trained length L on the
  same documents; a candidate costing more than ``guard`` (default 5%) over the unscaled model
  there is rejected.
* Parametric methods (yarn, ntk, linear, llama3) go through successive halving: every
  candidate on two documents, the best third on twice as many, ..., the last rung on all search
  documents. LongRoPE per-pair factors are found by an evolutionary search (LongRoPE, Ding et
  al. 2024) on a few documents, seeded with PI, NTK and YaRN (paper and tuned) written as
  factors; factors are kept in [1, 1.25 s] and non-decreasing with wavelength. Its best few are
  then scored on all search documents.
* Everything random draws from ``numpy.random.default_rng(seed)``; the budget is counted in
  document forwards at N, so ``--budget-evals`` (recorded in tune.json) replays a search exactly.
"""
