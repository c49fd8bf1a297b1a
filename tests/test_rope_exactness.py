"""Configs written by ctxext.rope load in transformers with exactly the paper frequencies.

For every method x model family we write config.json, load it with AutoConfig, build a tiny model
and read the inv_freq / attention_scaling its rotary module really uses, then compare with the
independent float64 references in ctxext.rope.formulas.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ctxext.rope import METHODS, analyze, extend_config  # noqa: E402
from ctxext.rope.formulas import reference_inv_freq  # noqa: E402

L = 2048  # trained length of every tiny config
COMMON = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": L,
}
# Each family also uses a different input style: legacy top-level keys, v5 rope_parameters, both.
TINY = {
    "llama": {**COMMON, "model_type": "llama", "rope_theta": 10000.0, "rope_scaling": None},
    "qwen2": {
        **COMMON,
        "model_type": "qwen2",
        "use_sliding_window": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    },
    "mistral": {
        **COMMON,
        "model_type": "mistral",
        "head_dim": 32,  # explicit head_dim != hidden / heads
        "sliding_window": 4096,
        "rope_theta": 500000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    },
    "gpt_neox": {  # Pythia-like: only a quarter of each head rotates
        "model_type": "gpt_neox",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "vocab_size": 128,
        "max_position_embeddings": L,
        "rotary_pct": 0.25,
        "rotary_emb_base": 10000,
    },
    # as transformers 5 saves phi: the rotary share only inside rope_parameters (not PhiConfig's
    # default 0.5, so a reader that loses it gets other frequencies)
    "phi": {
        **COMMON,
        "model_type": "phi",
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.75,
        },
    },
    "gemma3_text": {
        **COMMON,
        "model_type": "gemma3_text",
        "head_dim": 16,
        "sliding_window": 256,
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
    },
}
# Half the cases ask for a factor, half for a target length.
REQUEST = {
    "llama": {"factor": 4.0},
    "qwen2": {"target_length": 8192},
    "mistral": {"factor": 2.5},
    "gpt_neox": {"target_length": 16384},
    "phi": {"factor": 3.0},
    "gemma3_text": {"factor": 8.0},
}
DYNAMIC_SEQ_LEN = 3 * L + 77  # beyond the trained length, so dynamic NTK rescales


@pytest.fixture(autouse=True)
def _warnings_on():
    """In-process CLI tests quiet transformers (as the CLI does); these tests read its warnings."""
    before = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    yield
    transformers.logging.set_verbosity(before)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


def _rotary(model):
    (module,) = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    return module


def _build_from_written(cfg: dict, folder: Path):
    """Write ``cfg`` as config.json in ``folder`` and build the model transformers makes of it;
    returns (model, the warnings transformers logged while reading it)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    records = _Records()
    tf_logger = logging.getLogger("transformers")
    tf_logger.addHandler(records)
    try:
        hf_config = transformers.AutoConfig.from_pretrained(folder)
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    finally:
        tf_logger.removeHandler(records)
    return model, tuple(records.messages)


@functools.cache
def _load(family: str, method: str, tmp_root: str):
    """Write the extended config, load it in transformers; returns (config dict, rotary, logs)."""
    cfg = extend_config(TINY[family], method, **REQUEST[family])
    folder = Path(tmp_root) / f"{family}-{method}"
    model, messages = _build_from_written(cfg, folder)
    return cfg, _rotary(model), messages


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("rope-exactness"))


def _expected(family: str, method: str, seq_len: int | None = None) -> tuple[np.ndarray, float]:
    info = analyze(TINY[family])
    s = REQUEST[family].get("factor") or REQUEST[family]["target_length"] / L
    return reference_inv_freq(
        method, info.rope_theta, info.rotary_dim, s, info.trained_length, seq_len=seq_len
    )


def _used(rot, method: str, layer_type: str | None) -> tuple[np.ndarray, float]:
    """inv_freq and cos/sin scale the rotary module uses (after a long forward for dynamic)."""
    prefix = f"{layer_type}_" if layer_type else ""
    if method == "dynamic":
        x = torch.zeros(1, dtype=torch.float32)
        positions = torch.tensor([[0, DYNAMIC_SEQ_LEN - 1]])
        args = (x, positions) if layer_type is None else (x, positions, layer_type)
        rot(*args)
    inv = getattr(rot, f"{prefix}inv_freq").detach().double().numpy()
    return inv, float(getattr(rot, f"{prefix}attention_scaling"))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", list(TINY))
def test_transformers_uses_reference_frequencies(family: str, method: str, tmp_root: str) -> None:
    _, rot, _ = _load(family, method, tmp_root)
    layer = "full_attention" if family == "gemma3_text" else None
    seq_len = DYNAMIC_SEQ_LEN if method == "dynamic" else None
    want_inv, want_scale = _expected(family, method, seq_len)
    got_inv, got_scale = _used(rot, method, layer)
    np.testing.assert_allclose(got_inv, want_inv, rtol=1e-6, atol=0)
    assert got_scale == pytest.approx(want_scale, rel=1e-12)
    unscaled, _ = reference_inv_freq("default", _theta(family), 2 * len(want_inv), 1.0, L)
    assert not np.allclose(got_inv, unscaled)  # the method really moved the frequencies


def _theta(family: str) -> float:
    return analyze(TINY[family]).rope_theta


@pytest.mark.parametrize("family", list(TINY))
def test_ntk_matches_bloc97_formula_written_out(family: str, tmp_root: str) -> None:
    """NTK against theta' = theta * s^(d/(d-2)) typed here, not through ctxext.rope.formulas.

    The writer computes the new base with ntk_theta, and so does the reference: comparing the
    two alone could never catch a wrong ntk_theta.
    """
    _, rot, _ = _load(family, "ntk", tmp_root)
    layer = "full_attention" if family == "gemma3_text" else None
    got, scale = _used(rot, "ntk", layer)
    theta, d, s = {  # each family's (theta, rotary dimension, factor), typed out
        "llama": (1e4, 16, 4.0),
        "qwen2": (1e6, 16, 4.0),
        "mistral": (5e5, 32, 2.5),
        "gpt_neox": (1e4, 8, 8.0),
        "phi": (1e4, 12, 3.0),
        "gemma3_text": (1e6, 16, 8.0),
    }[family]
    new_theta = theta * s ** (d / (d - 2))
    want = [new_theta ** (-2 * j / d) for j in range(d // 2)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    assert scale == 1.0
    assert got[-1] == pytest.approx(theta ** (-(d - 2) / d) / s, rel=1e-6)  # PI at the end


# Gemma 3's sliding layers keeping their local frequencies under every method: the
# architecture matrix (tests/test_arch_matrix.py) checks it on a gemma3_text checkpoint.


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", list(TINY))
def test_load_is_warning_free(family: str, method: str, tmp_root: str) -> None:
    _, _, messages = _load(family, method, tmp_root)
    assert messages == (), messages  # no warning at all, rope-related or not


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", list(TINY))
def test_transformers_sees_written_lengths(family: str, method: str, tmp_root: str) -> None:
    cfg, rot, _ = _load(family, method, tmp_root)
    assert rot.config.max_position_embeddings == cfg["max_position_embeddings"]
    params = rot.config.rope_parameters
    entry = params["full_attention"] if family == "gemma3_text" else params
    assert entry["rope_type"] == ("default" if method == "ntk" else method)
    if method in ("yarn", "llama3"):
        assert entry["original_max_position_embeddings"] == L


@pytest.mark.parametrize("drop", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", list(TINY))
def test_either_half_alone_gives_the_same_frequencies(
    family: str, method: str, drop: str, tmp_root: str, tmp_path
) -> None:
    """A reader that keeps only rope_parameters (v5 save) or only the legacy keys agrees."""
    cfg, rot, _ = _load(family, method, tmp_root)
    half = {k: v for k, v in cfg.items() if k != drop}
    (tmp_path / "config.json").write_text(json.dumps(half))
    hf_config = transformers.AutoConfig.from_pretrained(tmp_path)
    alone = type(rot)(hf_config)
    layers = ["full_attention", "sliding_attention"] if family == "gemma3_text" else [None]
    for layer in layers:
        want = _used(rot, method, layer)
        got = _used(alone, method, layer)
        np.testing.assert_array_equal(got[0], want[0])
        assert got[1] == want[1]


def test_warning_capture_works(tmp_path) -> None:
    """Control for test_load_is_warning_free: transformers does warn about a stray key."""
    cfg = extend_config(TINY["llama"], "linear", 2.0)
    cfg["rope_parameters"]["original_max_position_embeddings"] = L
    cfg["rope_scaling"]["original_max_position_embeddings"] = L
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    records = _Records()
    tf_logger = logging.getLogger("transformers")
    tf_logger.addHandler(records)
    try:
        transformers.AutoConfig.from_pretrained(tmp_path)
    finally:
        tf_logger.removeHandler(records)
    assert any("Unrecognized keys" in m for m in records.messages), records.messages


# --------------------------------------------------------------------------- relative positions

_APPLY = {
    "llama": transformers.models.llama.modeling_llama.apply_rotary_pos_emb,
    "gpt_neox": transformers.models.gpt_neox.modeling_gpt_neox.apply_rotary_pos_emb,
}


def _score(rot, q, k, m: int, n: int, apply) -> float:
    """q.k after transformers rotates q to position m and k to n.

    cos/sin come from the rotary module's own forward pass (built from our written config:
    its inv_freq, attention scaling and, for dynamic, its sequence-length update), and the
    rotation from the model family's own apply_rotary_pos_emb.
    """
    x = torch.zeros(1, dtype=torch.float64)
    cos, sin = rot(x, torch.tensor([[m, n]]))  # shapes [1, 2, rotary_dim]
    q_rot, _ = apply(q[None, None, None, :], q[None, None, None, :], cos[:, :1], sin[:, :1])
    k_rot, _ = apply(k[None, None, None, :], k[None, None, None, :], cos[:, 1:], sin[:, 1:])
    return float(q_rot.reshape(-1) @ k_rot.reshape(-1))


def _paper_score(q, k, distance: int, inv: np.ndarray, scale: float) -> float:
    """The same score from the paper's closed form: a function of n - m only.

    Pair i = (x_i, x_{i+h}) of a vector at position p is turned by the angle p * theta_i, and
    R(a)u . R(b)v = u . R(b - a)v, so q.k = scale^2 sum_i [(u1 v1 + u2 v2) cos(phi_i) +
    (u2 v1 - u1 v2) sin(phi_i)] with phi_i = (n - m) theta_i; dimensions past the rotary part
    (partial rotary) are not turned.
    """
    q, k = q.numpy(), k.numpy()
    h = len(inv)
    u1, u2, v1, v2 = q[:h], q[h : 2 * h], k[:h], k[h : 2 * h]
    phi = distance * inv
    turned = np.sum((u1 * v1 + u2 * v2) * np.cos(phi) + (u2 * v1 - u1 * v2) * np.sin(phi))
    return float(scale**2 * turned + q[2 * h :] @ k[2 * h :])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(0, 4 * L),
    n=st.integers(0, 4 * L),
    shift=st.integers(0, 4 * L),
    seed=st.integers(0, 2**32 - 1),
)
def test_scores_depend_only_on_distance(
    family: str, method: str, tmp_root: str, m: int, n: int, shift: int, seed: int
) -> None:
    """Shifting both positions leaves q.k unchanged, and q.k is the paper's function of n - m.

    The second check is what makes this fail for a wrong writer: any frequencies give shift
    invariance, only the paper's frequencies give the paper's scores.
    """
    _, loaded, _ = _load(family, method, tmp_root)
    head_dim = 16 if family == "llama" else 32
    rng = np.random.default_rng(seed)
    q = torch.from_numpy(rng.standard_normal(head_dim))
    k = torch.from_numpy(rng.standard_normal(head_dim))
    scores = []
    for first, second in ((m, n), (m + shift, n + shift)):
        # dynamic NTK keeps the longest length it has seen: a fresh module per forward pass
        rot = type(loaded)(loaded.config) if method == "dynamic" else loaded
        seq_len = max(first, second) + 1 if method == "dynamic" else None
        inv, scale = _expected(family, method, seq_len)
        got = _score(rot, q, k, first, second, _APPLY[family])
        want = _paper_score(q, k, second - first, inv, scale)
        # transformers turns positions into angles in float32: |error| <= ~2e-3 rad here
        bound = float(q.norm() * k.norm()) * scale**2 * 5e-3
        assert abs(got - want) <= bound, (first, second, got, want)
        scores.append(got)
    if method != "dynamic":  # dynamic rescales with the longest position, by design
        assert abs(scores[0] - scores[1]) <= float(q.norm() * k.norm()) * 1e-2


# --------------------------------------------------------------------------- longrope


def _longrope_factors(family: str, seed: int) -> tuple[list[float], list[float]]:
    """Seeded per-pair factors: long ones non-decreasing from 1 to ~s, short ones near 1."""
    pairs = analyze(TINY[family]).rotary_dim // 2
    rng = np.random.default_rng(seed)
    s = REQUEST[family].get("factor") or REQUEST[family]["target_length"] / L
    long = np.maximum.accumulate(1.0 + (s - 1.0) * np.sort(rng.random(pairs)))
    short = 1.0 + 0.05 * rng.random(pairs)
    return long.tolist(), short.tolist()


@functools.cache
def _load_longrope(family: str, attention_factor: float | None, tmp_root: str):
    long, short = _longrope_factors(family, seed=len(family))
    cfg = extend_config(
        TINY[family],
        "longrope",
        **REQUEST[family],
        long_factor=long,
        short_factor=short,
        attention_factor=attention_factor,
    )
    folder = Path(tmp_root) / f"{family}-longrope-{attention_factor}"
    model, messages = _build_from_written(cfg, folder)
    return cfg, _rotary(model), messages, long, short


def _longrope_used(rot, layer: str | None, seq_len: int) -> tuple[np.ndarray, float]:
    """inv_freq and scale after a forward whose positions reach seq_len - 1."""
    x = torch.zeros(1, dtype=torch.float32)
    positions = torch.tensor([[0, seq_len - 1]])
    rot(*((x, positions) if layer is None else (x, positions, layer)))
    prefix = f"{layer}_" if layer else ""
    inv = getattr(rot, f"{prefix}inv_freq").detach().double().numpy()
    return inv, float(getattr(rot, f"{prefix}attention_scaling"))


@pytest.mark.parametrize("attention_factor", [None, 1.05])
@pytest.mark.parametrize("family", list(TINY))
def test_longrope_matches_reference_short_and_long(
    family: str, attention_factor: float | None, tmp_root: str
) -> None:
    """transformers picks short_factor up to L and long_factor beyond, as the reference does."""
    _, rot, messages, long, short = _load_longrope(family, attention_factor, tmp_root)
    assert messages == (), messages
    info = analyze(TINY[family])
    s = REQUEST[family].get("factor") or REQUEST[family]["target_length"] / L
    layer = "full_attention" if family == "gemma3_text" else None
    opts = {"long_factor": long, "short_factor": short, "attention_factor": attention_factor}
    # Long first, then back to short: the switch goes both ways (like Phi-3).
    for seq_len in (L + 1, 3 * L, L, 17):
        want_inv, want_scale = reference_inv_freq(
            "longrope", info.rope_theta, info.rotary_dim, s, L, seq_len=seq_len, **opts
        )
        got_inv, got_scale = _longrope_used(rot, layer, seq_len)
        np.testing.assert_allclose(got_inv, want_inv, rtol=1e-6, atol=0)
        assert got_scale == pytest.approx(want_scale, rel=1e-12)
    if attention_factor is None:  # the default is LongRoPE's, from the written factor s
        assert got_scale == pytest.approx(np.sqrt(1 + np.log(s) / np.log(L)), rel=1e-12)


@pytest.mark.parametrize("drop", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox"])
def test_longrope_either_half_alone(family: str, drop: str, tmp_root: str, tmp_path) -> None:
    cfg, rot, _, _, _ = _load_longrope(family, None, tmp_root)
    half = {k: v for k, v in cfg.items() if k != drop}
    (tmp_path / "config.json").write_text(json.dumps(half))
    alone = type(rot)(transformers.AutoConfig.from_pretrained(tmp_path))
    for seq_len in (L + 1, L):
        np.testing.assert_array_equal(
            _longrope_used(alone, None, seq_len)[0], _longrope_used(rot, None, seq_len)[0]
        )


def test_longrope_reference_reproduces_pi_ntk_yarn() -> None:
    """The per-pair view is exact: PI, NTK and YaRN written as factors give their frequencies."""
    from ctxext.rope.formulas import rescale_factors

    theta, d, s = 10000.0, 64, 8.0
    for method in ("linear", "ntk", "yarn"):
        inv, _ = reference_inv_freq(method, theta, d, s, L)
        lam = rescale_factors(inv, theta, d)
        got, _ = reference_inv_freq("longrope", theta, d, s, L, seq_len=L + 1, long_factor=lam)
        np.testing.assert_allclose(got, inv, rtol=1e-12)
        assert np.all(np.diff(lam) >= -1e-12)  # non-decreasing with wavelength
    lam_pi = rescale_factors(reference_inv_freq("linear", theta, d, s, L)[0], theta, d)
    np.testing.assert_allclose(lam_pi, s, rtol=1e-12)
