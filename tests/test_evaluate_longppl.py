"""`--task longppl`: LongPPL over a sweep of lengths (equal to the reference at each length),
the task in configs, recipes and the CLI, and its results beside the far-context gain's."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import BUNDLED, run_cli
from test_longppl_reference import reference_longppl
from transformers import AutoConfig, AutoModelForCausalLM

from ctxext.config import EvalConfig
from ctxext.evaluate.longppl import longppl_sweep, longppl_sweep_tokens


def _bundled(**rope):
    config = AutoConfig.from_pretrained(BUNDLED)
    if rope:
        config.rope_parameters = {**config.rope_parameters, **rope}
    return AutoModelForCausalLM.from_pretrained(BUNDLED, config=config, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def held_out():
    """The first 300 tokens of a held-out file that has them, no BOS. Repeated, their second
    copy can be copied from far back, out of a short context, which is what makes key tokens."""
    from ctxext.corpus import stdlib_documents
    from ctxext.modeling import load_tokenizer

    tok = load_tokenizer(BUNDLED)
    docs = (tok(d.text, add_special_tokens=False)["input_ids"] for d in stdlib_documents("heldout"))
    return next(ids for ids in docs if len(ids) >= 300)[:300]


def test_the_sweep_equals_the_reference_at_each_length(held_out):
    """One pass at the longest length serves every length: each equals the reference's
    find_key_token + compute_longppl on that length's tokens (lengths up to W + S have no cut
    token and no result)."""
    model = _bundled()
    seq = held_out[:60] * 2  # the copy at 60 reads its original 60 tokens back, past 32 to 39
    sweep = longppl_sweep(model, [seq], [40, 90, 120], window=32, stride=8, bos=False)
    assert sorted(sweep) == [90, 120]
    for n, res in sweep.items():
        want_ppl, want_count = reference_longppl(model, torch.tensor([seq[:n]]), 32, 8)
        assert want_count > 0 and res.key_tokens == want_count, n
        assert res.key_ppl == pytest.approx(want_ppl, rel=1e-4)
        assert (res.window, res.stride, res.n_docs, res.n_tokens) == (32, 8, 1, n - 1)


def test_a_length_dependent_rope_gets_both_passes_afresh_per_length(held_out):
    """Dynamic NTK (inputs past the trained 256 positions rescale it): each length of the sweep
    equals that length alone on a fresh model, the longer first. At 340 (between W + S and
    W + 2S) the one cut chunk is [60, 340), 280 positions, whose frequencies differ from those
    of the 300-position chunk the longest length runs there; tokens 300.. repeat 0.., out of it."""
    dynamic = {"rope_type": "dynamic", "factor": 2.0}
    seq = held_out + held_out[:260]
    lengths = [340, 400, 560]
    model = _bundled(**dynamic)
    fed: list[int] = []  # the length of every input the decoder sees
    hook = model.get_decoder().register_forward_pre_hook(
        lambda m, a, kw: fed.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        sweep = longppl_sweep(
            model, [seq], lengths, window=240, stride=60, bos=False, one_pass=False
        )
    finally:
        hook.remove()
    # The head check; a full pass per length; then per length its own chunks, each length's
    # after a rotary reset (a one-token input): at 340 one of 280, at 400 300 + 280, at 560
    # 4 x 300 + 260.
    chunks = [1, 280, 1, 300, 280, 1, 300, 300, 300, 300, 260]
    assert fed == [32, 32, 1, 340, 1, 400, 1, 560, *chunks]
    for n in reversed(lengths):
        (alone,) = longppl_sweep(
            _bundled(**dynamic), [seq[:n]], [n], window=240, stride=60, bos=False
        ).values()
        assert sweep[n].key_tokens == alone.key_tokens > 0, n
        assert sweep[n].key_ppl == pytest.approx(alone.key_ppl, rel=1e-5)


@pytest.mark.parametrize("one_pass", [True, False])
def test_sweep_progress_ends_at_the_planned_total(held_out, one_pass):
    seen: list[int] = []
    lengths = [40, 80, 117]
    model = _bundled()
    longppl_sweep(
        model, [held_out[:117], held_out[1:118]], lengths, window=32, stride=8, bos=False,
        one_pass=one_pass, progress=seen.append,
    )  # fmt: skip
    assert seen[-1] == longppl_sweep_tokens(2, lengths, 32, 8, one_pass)
    assert longppl_sweep_tokens(2, [40], 32, 8, one_pass) == 0


def test_longppl_is_a_task_of_configs_and_recipes():
    from ctxext.recipes.loader import load_recipe

    assert EvalConfig(lengths=[64], tasks="context-use,longppl").tasks == ["context-use", "longppl"]
    assert EvalConfig(lengths=[64], tasks=["LongPPL"]).tasks == ["longppl"]
    recipe = load_recipe("tiny-yarn", ["eval.tasks=[context-use, longppl]"]).recipe
    assert recipe.eval.tasks == ["context-use", "longppl"]


def _eval(capsys, model, out, tasks: str) -> dict:
    code, stdout, err = run_cli(
        capsys, "eval", model, "--task", tasks, "--lengths", "64,128,192", "--local-window",
        "32", "--local-stride", "16", "--num-docs", "2", "-o", out, "--json",
    )  # fmt: skip
    assert code == 0, err
    return json.loads(stdout)


def test_longppl_beside_the_gain_leaves_the_gain_alone(tmp_path, tiny_llama_session, capsys):
    """`--task context-use,longppl`: LongPPL at every length with a cut token (> W + S), on
    the gain's documents, in its own key with its protocol; the gain's figures equal those of
    `--task context-use` alone, which carries no key tokens."""
    both = _eval(capsys, tiny_llama_session, tmp_path / "both", "context-use,longppl")
    alone = _eval(capsys, tiny_llama_session, tmp_path / "alone", "context-use")
    (run,), (plain,) = both["runs"], alone["runs"]
    assert run["context_use"] == plain["context_use"]
    assert "longppl" not in plain and "longppl" not in alone["protocol"]
    assert not any("key_ppl" in g for g in plain["context_use"].values())
    keys = run["longppl"]
    assert sorted(keys, key=int) == ["64", "128", "192"]  # all past W + S = 48
    for n, res in keys.items():
        assert (res["window"], res["stride"], res["n_docs"]) == (32, 16, 2)
        assert res["n_tokens"] == 2 * (int(n) - 1)
        assert res["doc_fingerprint"] == run["context_use"][n]["doc_fingerprint"]
    proto = both["protocol"]["longppl"]
    assert (proto["short_window"], proto["short_stride"]) == (32, 16)
    assert (proto["key_token_nats"], proto["key_token_max_nll"]) == (2.0, 2.0)
    assert "chunks of 48 positions starting every 16" in proto["description"]
    csv_text = (tmp_path / "both" / "results.csv").read_text()
    assert sum(line.split(",")[3] == "longppl" for line in csv_text.splitlines()) == 3
