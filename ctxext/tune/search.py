"""Candidates, LongRoPE factors, scoring on one loaded model, and the search itself
(successive halving for the parametric methods, LongRoPE's evolution; see :mod:`ctxext.tune`)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctxext import rope
from ctxext.config import TUNE_METHODS, ExtendConfig, TuneConfig, parse_model
from ctxext.errors import CtxextError
from ctxext.rope.methods import FACTOR_LIST_METHODS, METHODS

SEARCHABLE = TUNE_METHODS
#: Searched by successive halving (the others, longrope, by evolution).
PARAMETRIC = tuple(m for m in SEARCHABLE if m not in FACTOR_LIST_METHODS)
#: Paper defaults shown in the leaderboard (longrope has no default: its factors are searched).
DEFAULT_ROWS = METHODS
#: Candidates per method are split in this proportion (more hyperparameters, more candidates;
#: 1 for the others).
_WEIGHT = {"yarn": 3, "llama3": 2}
_ETA = 3  # successive halving keeps the best 1/eta at each rung
_LONGROPE_FINALISTS = 3


# --------------------------------------------------------------------------- candidates


@dataclass(frozen=True)
class Candidate:
    """A method and its hyperparameters (the ExtendConfig fields besides method and length)."""

    method: str
    params: tuple[tuple[str, Any], ...] = ()
    origin: str = "default"

    @property
    def key(self) -> str:
        return json.dumps([self.method, self.params])

    def spec(self, target_length: int) -> ExtendConfig:
        data: dict[str, Any] = {"method": self.method, **dict(self.params)}
        if "factor" not in data:
            data["target_length"] = target_length
        return parse_model(ExtendConfig, data, "tune candidate")  # type: ignore[return-value]


def _cand(method: str, origin: str, **params: Any) -> Candidate:
    clean = {k: _round(v) for k, v in params.items()}
    return Candidate(method, tuple(sorted(clean.items())), origin)


def _round(value: Any) -> Any:
    if isinstance(value, (list, tuple, np.ndarray)):
        return tuple(float(f"{float(v):.4g}") for v in value)
    return float(f"{float(value):.4g}")


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def sample_candidates(
    method: str, n: int, s: float, rotary_dim: int, rng: np.random.Generator
) -> list[Candidate]:
    """The paper default plus ``n - 1`` candidates (a log grid for 1-D spaces, else random)."""
    out = [Candidate(method)]
    k = max(n - 1, 1)
    if method == "linear":  # PI's factor at or above N / L, on whole 1/4 steps
        grid = sorted({math.ceil(4 * s * 3.0 ** (i / k)) / 4 for i in range(1, k + 1)} - {s})
        out += [_cand("linear", "grid", factor=f) for f in grid]
    elif method == "ntk":  # theta multiplier around bloc97's s^(d/(d-2)), from sqrt(s) to s^3
        grid = np.exp(np.linspace(math.log(s) * 0.5, math.log(s) * 3.0, k))
        out += [_cand("ntk", "grid", theta_multiplier=m) for m in grid]
    elif method == "yarn":
        for _ in range(k):
            fast = _log_uniform(rng, 2.0, 128.0)
            slow = _log_uniform(rng, 0.05, min(fast / 2.0, 16.0))
            att = rng.uniform(1.0, 1.0 + 0.2 * math.log(s))
            out.append(
                _cand("yarn", "random", beta_fast=fast, beta_slow=slow, attention_factor=att)
            )
    elif method == "llama3":
        for _ in range(k):
            low = _log_uniform(rng, 0.25, 4.0)
            high = low * _log_uniform(rng, 1.5, 32.0)
            out.append(_cand("llama3", "random", low_freq_factor=low, high_freq_factor=high))
    else:
        raise CtxextError(f"cannot sample method {method!r}")
    return out


# --------------------------------------------------------------------------- LongRoPE factors


def method_factors(spec: ExtendConfig, info: rope.RopeInfo, target_length: int) -> np.ndarray:
    """Any method's effect written as LongRoPE per-pair divisors lambda_j (reference maths)."""
    from ctxext.rope import formulas as ref

    s = target_length / info.trained_length if spec.factor is None else spec.factor
    if spec.method == "ntk" and spec.theta_multiplier is not None:
        inv = ref.default_inv_freq(info.rope_theta * spec.theta_multiplier, info.rotary_dim)
    else:
        opts = {
            k: v for k, v in spec.rope_options().items() if k in ref.OPTION_DEFAULTS[spec.method]
        }
        inv, _ = ref.reference_inv_freq(
            spec.method, info.rope_theta, info.rotary_dim, s, info.trained_length, **opts
        )
    return ref.rescale_factors(inv, info.rope_theta, info.rotary_dim)


def repair(factors: np.ndarray, s: float) -> np.ndarray:
    """LongRoPE's constraints: within [1, 1.25 s], non-decreasing from high to low frequency."""
    return np.maximum.accumulate(np.clip(factors, 1.0, 1.25 * s))


def mutate(factors: np.ndarray, s: float, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Multiply a random third of the factors by exp(N(0, sigma)), then repair."""
    mask = rng.random(factors.shape) < 1.0 / 3.0
    noise = np.exp(rng.normal(0.0, sigma, factors.shape))
    return repair(np.where(mask, factors * noise, factors), s)


def crossover(a: np.ndarray, b: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """Each pair's factor from one parent or the other, then repair."""
    return repair(np.where(rng.random(a.shape) < 0.5, a, b), s)


# --------------------------------------------------------------------------- scoring


@dataclass
class RopeNow:
    """The config dict of the rope a model has now (None: its base config, as loaded), shared
    by every Scorer of that model. Swapping in place rebuilds the rotary modules from the
    model's config object, into which only the attributes where the old and new dicts differ
    are written (:func:`ctxext.modeling.swap_rope`): a swap that starts from the wrong dict
    leaves the previous candidate's rope in place."""

    config: dict[str, Any] | None = None


@dataclass
class Scorer:
    """Per-document NLL of candidates at given lengths, memoised, on one loaded model."""

    model: Any
    base_config: dict[str, Any]
    docs: list[list[int]]  # token ids of the candidate documents (search or report)
    bos: int | None
    target_length: int
    spent: float = 0.0  # cost in document forwards at the target length
    cost_ratio: float = 0.125  # cost of a forward at L relative to one at N (L / N)
    rope_now: RopeNow = field(default_factory=RopeNow)
    """What rope the model has: give every Scorer of one model the same one."""
    _memo: dict[tuple[str, int, int], tuple[float, int]] = field(default_factory=dict)

    def apply(self, cand: Candidate | None) -> None:
        """Give the model ``cand``'s rope (None: the unscaled config); no-op if it has it.

        `tune` scores the search and the report documents with two Scorers on one model,
        sharing one :class:`RopeNow`: the report's must start from the rope the search left."""
        config = self.base_config
        if cand is not None:
            spec = cand.spec(self.target_length)
            config = rope.extend_config(
                config, spec.method, spec.factor, spec.target_length, **spec.rope_options()
            )
        current = self.rope_now.config or self.base_config
        if config == current:
            return
        from ctxext.modeling import swap_rope

        if not swap_rope(self.model, current, config):
            raise CtxextError(
                f"tune cannot change the rope of {type(self.model).__name__} in place (spread "
                "over devices, remote code, or rope read outside its rotary modules); tune "
                "a model transformers implements, on one device"
            )
        self.rope_now.config = config

    def nll(self, cand: Candidate | None, doc: int, length: int) -> tuple[float, int]:
        from ctxext.evaluate.perplexity import evaluate_perplexity

        memo_key = ("base" if cand is None else cand.key, doc, length)
        if memo_key not in self._memo:
            self.apply(cand)
            res = evaluate_perplexity(self.model, [self.docs[doc]], length, bos_token_id=self.bos)
            self._memo[memo_key] = (res.nll_sum, res.n_tokens)
            self.spent += 1.0 if length == self.target_length else self.cost_ratio
        return self._memo[memo_key]

    def ppl(self, cand: Candidate | None, docs: list[int], length: int) -> float:
        parts = [self.nll(cand, d, length) for d in docs]
        total = sum(p[0] for p in parts)
        count = sum(p[1] for p in parts)
        return math.exp(total / count) if total / count < 700 else math.inf


# --------------------------------------------------------------------------- the search


@dataclass
class Trial:
    """One candidate's scores on the search documents (the rung it reached)."""

    candidate: Candidate
    n_docs: int = 0
    ppl_target: float = math.inf
    ppl_trained: float = math.inf
    guard_ref: float = math.inf  # the unscaled model's ppl at L on the same documents
    rejected: bool = False

    def record(self) -> dict[str, Any]:
        return {
            "method": self.candidate.method,
            "params": _jsonable(dict(self.candidate.params)),
            "origin": self.candidate.origin,
            "search_docs_scored": self.n_docs,
            "ppl_at_target": self.ppl_target,
            "ppl_at_trained": self.ppl_trained,
            "unscaled_ppl_at_trained": self.guard_ref,
            "trained_cost": self.ppl_trained / self.guard_ref - 1.0,
            "rejected_by_guard": self.rejected,
        }


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}


Progress = Callable[[float, str], None]


@dataclass
class Search:
    """State of one tuning run: the scorer, the trials so far, the guard reference."""

    scorer: Scorer
    cfg: TuneConfig
    info: rope.RopeInfo
    rng: np.random.Generator
    progress: Progress
    trials: dict[str, Trial] = field(default_factory=dict)

    @property
    def s(self) -> float:
        return self.cfg.target_length / self.info.trained_length

    def guard_ref(self, docs: list[int]) -> float:
        return self.scorer.ppl(None, docs, self.info.trained_length)

    def score(self, cand: Candidate, docs: list[int]) -> Trial:
        """Guard first (cheap, at L), then the target length unless the guard rejects."""
        trial = self.trials.setdefault(cand.key, Trial(cand))
        trial.ppl_trained = self.scorer.ppl(cand, docs, self.info.trained_length)
        trial.guard_ref = self.guard_ref(docs)
        trial.rejected = trial.ppl_trained > trial.guard_ref * (1.0 + self.cfg.guard)
        trial.n_docs = len(docs)
        if not trial.rejected:
            trial.ppl_target = self.scorer.ppl(cand, docs, self.cfg.target_length)
        self.progress(self.scorer.spent, self.best_line())
        return trial

    def best_line(self) -> str:
        full = self.cfg.search_docs
        done = [t for t in self.trials.values() if not t.rejected and t.n_docs == full]
        if not done:
            return "no candidate through all search documents yet"
        best = min(done, key=lambda t: t.ppl_target)
        return f"best {best.candidate.method} ppl {best.ppl_target:.2f}"

    def halving(self, candidates: list[Candidate], rungs: list[int]) -> list[Trial]:
        """Successive halving: all on rungs[0] docs, the best 1/eta on the next rung, ..."""
        alive = candidates
        survivors: list[Trial] = []
        for i, n_docs in enumerate(rungs):
            docs = list(range(n_docs))
            scored = [self.score(c, docs) for c in alive]
            survivors = sorted((t for t in scored if not t.rejected), key=lambda t: t.ppl_target)
            if i + 1 < len(rungs):
                keep = max(1, math.ceil(len(survivors) / _ETA))
                alive = [t.candidate for t in survivors[:keep]]
        return survivors

    def evolve(self, seeds: list[np.ndarray], n_children: int, docs: list[int]) -> list[Trial]:
        """LongRoPE's evolutionary search over per-pair factors, fitness = ppl at N on docs."""
        pop_size = int(min(24, max(6, n_children // 5)))
        population = [repair(f, self.s) for f in seeds]
        while len(population) < pop_size:
            parent = population[int(self.rng.integers(len(seeds)))]
            population.append(mutate(parent, self.s, self.rng, sigma=0.3))
        scored = [self._score_factors(f, "init", docs) for f in population]
        generation = 0
        while len(scored) < n_children + len(seeds):
            generation += 1
            parents = sorted(scored, key=lambda t: t.ppl_target)[: max(2, pop_size // 4)]
            pool = [np.asarray(t.candidate.params[0][1]) for t in parents]
            for _ in range(pop_size - len(parents)):
                a = pool[int(self.rng.integers(len(pool)))]
                if self.rng.random() < 0.5:
                    child = crossover(a, pool[int(self.rng.integers(len(pool)))], self.s, self.rng)
                else:
                    child = a
                child = mutate(child, self.s, self.rng, sigma=0.3 / (1 + generation) ** 0.5)
                scored.append(self._score_factors(child, f"generation {generation}", docs))
        ranked = sorted({t.candidate.key: t for t in scored}.values(), key=lambda t: t.ppl_target)
        return [t for t in ranked if not t.rejected]

    def _score_factors(self, factors: np.ndarray, origin: str, docs: list[int]) -> Trial:
        return self.score(_cand("longrope", origin, long_factor=factors), docs)


def _rungs(search_docs: int) -> list[int]:
    rungs = [min(2, search_docs)]
    while rungs[-1] < search_docs:
        rungs.append(min(2 * rungs[-1], search_docs))
    return rungs


def _halving_cost(rungs: list[int]) -> float:
    """Expected forwards at N per initial candidate (later rungs reuse earlier documents)."""
    cost, prev = 0.0, 0
    for i, n in enumerate(rungs):
        cost += (n - prev) / _ETA**i
        prev = n
    return cost


@dataclass(frozen=True)
class BudgetAllocation:
    """How the budget is spent (recorded in tune.json under "plan")."""

    budget_evals: int
    per_method: dict[str, int]
    rungs: list[int]
    longrope_children: int
    longrope_docs: int


def allocate_budget(cfg: TuneConfig, budget_evals: int, cost_ratio: float) -> BudgetAllocation:
    """Split the budget: parametric methods by successive halving, then LongRoPE's evolution."""
    rungs = _rungs(cfg.search_docs)
    params = [m for m in cfg.methods if m in PARAMETRIC]
    longrope = "longrope" in cfg.methods
    share = (0.45 if longrope else 0.95) if params else 0.0
    per_cand = _halving_cost(rungs) * (1.0 + cost_ratio)
    n_param = int(budget_evals * share / per_cand)
    weight = sum(_WEIGHT.get(m, 1) for m in params) or 1
    per_method = {m: max(3, n_param * _WEIGHT.get(m, 1) // weight) for m in params}
    evo_docs = rungs[1] if len(rungs) > 1 else rungs[0]
    final = _LONGROPE_FINALISTS * (cfg.search_docs - evo_docs) * (1.0 + cost_ratio)
    evo_budget = budget_evals * (0.95 - share) - final if longrope else 0.0
    children = int(max(0.0, evo_budget) / (evo_docs * (1.0 + cost_ratio)))
    return BudgetAllocation(
        budget_evals, per_method, rungs, max(children, 6) if longrope else 0, evo_docs
    )


def run_search(search: Search, allocation: BudgetAllocation) -> dict[str, Trial]:
    """Every method's best guard-passing trial on all search documents."""
    best: dict[str, Trial] = {}
    for method, n in allocation.per_method.items():
        cands = sample_candidates(method, n, search.s, search.info.rotary_dim, search.rng)
        survivors = search.halving(cands, allocation.rungs)
        if survivors:
            best[method] = survivors[0]
    if allocation.longrope_children:
        docs = list(range(allocation.longrope_docs))
        evolved = search.evolve(_longrope_seeds(search, best), allocation.longrope_children, docs)
        everything = list(range(search.cfg.search_docs))
        finals = [search.score(t.candidate, everything) for t in evolved[:_LONGROPE_FINALISTS]]
        finals = sorted((t for t in finals if not t.rejected), key=lambda t: t.ppl_target)
        if finals:
            best["longrope"] = finals[0]
    return best


def _longrope_seeds(search: Search, best: dict[str, Trial]) -> list[np.ndarray]:
    """PI, NTK and YaRN at their paper settings, plus every tuned best, as per-pair factors."""
    n = search.cfg.target_length
    specs = [Candidate(m).spec(n) for m in ("linear", "ntk", "yarn")]
    specs += [t.candidate.spec(n) for t in best.values()]
    return [method_factors(spec, search.info, n) for spec in specs]
