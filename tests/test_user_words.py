"""Errors in the user's words: a bad flag is named by the flag (not the schema's key path),
method and task names are case-insensitive with "did you mean" for near misses, and a length
no document holds is refused before the whole data is tokenized."""

from __future__ import annotations

import pytest
from conftest import BUNDLED, run_cli

from ctxext.errors import CtxextError


@pytest.mark.parametrize(
    ("args", "line"),
    [
        # before: "extend options: (top level): give exactly one of factor and target_length"
        (["extend", "-m", "yarn", "-o", "OUT"], "give exactly one of --factor and --target-length"),
        (
            ["extend", "-m", "yarn", "-f", "2", "-t", "1024", "-o", "OUT"],
            "give exactly one of --factor and --target-length",
        ),
        # before: "eval options: tasks.0: expected 'ppl', 'passkey', ... (got 'pll')"
        (
            ["eval", "--task", "pll", "--lengths", "64"],
            "--task: unknown task 'pll'; did you mean 'ppl'? "
            "(one of: ppl, passkey, context-use, retrieval, longppl)",
        ),
        # before: "extend options: method: expected 'linear', ... (got 'yarnn')"
        (
            ["extend", "-m", "yarnn", "-f", "2", "-o", "OUT"],
            "--method: unknown method 'yarnn'; did you mean 'yarn'? "
            "(one of: linear, ntk, yarn, dynamic, llama3, longrope)",
        ),
        (
            ["extend", "-m", "rope2x", "-f", "2", "-o", "OUT"],
            "--method: unknown method 'rope2x' (one of: linear, ntk, yarn, dynamic, llama3, "
            "longrope)",
        ),
        (
            ["extend", "-m", "yarn", "-f", "2", "--beta-fast", "1", "--beta-slow", "2", "-o", "O"],
            "--beta-fast must be greater than --beta-slow",
        ),
        (
            ["eval", "--lengths", "64", "--local-window", "4", "--local-stride", "8"],
            "--local-stride (8) must not exceed --local-window (4)",
        ),
        (["finetune", "-m", "yarn", "-f", "2", "--steps", "0", "-o", "OUT"], "--steps: must be"),
        (
            ["finetune", "-m", "yarn", "-f", "2", "--task-keys", "0", "-o", "OUT"],
            "--task-keys: must be a positive integer (got 0)",
        ),
        (
            ["tune", "--target-length", "512", "--methods", "yarn,ntx", "-o", "OUT"],
            "--methods: unknown method 'ntx'; did you mean 'ntk'?",
        ),
    ],
)
def test_flag_errors_name_the_flag(capsys, tmp_path, args, line):
    args = [str(tmp_path / a) if a in ("OUT", "O") else a for a in args]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: {line}"), err
    assert "options:" not in err and "(top level)" not in err and "tasks.0" not in err


def test_recipe_errors_keep_the_recipe_keys(capsys):
    """A recipe's author wrote keys: a recipe error names them (and the line or override)."""
    code, _, err = run_cli(capsys, "recipes", "validate", "tiny-yarn", "extend.factor=null")
    assert code == 2 and "extend (line " in err
    assert err.rstrip().endswith("give exactly one of factor and target_length"), err
    code, _, err = run_cli(capsys, "recipes", "validate", "tiny-yarn", "eval.tasks=[ppl,retrievl]")
    assert code == 2 and "eval.tasks (from the override" in err
    assert "unknown task 'retrievl'; did you mean 'retrieval'?" in err


def test_method_and_task_names_ignore_case(capsys, tmp_path):
    from ctxext.config import EvalConfig, ExtendConfig, TuneConfig

    assert ExtendConfig(method="YaRN", factor=2).method == "yarn"  # the README's spelling
    assert ExtendConfig(method="Linear", factor=2).method == "linear"
    assert EvalConfig(lengths=[64], tasks=["PPL", "Context-Use"]).tasks == ["ppl", "context-use"]
    assert TuneConfig(target_length=512, methods=["YaRN", "LongRoPE"]).methods == [
        "yarn",
        "longrope",
    ]
    code, _, err = run_cli(capsys, "extend", "-m", "YaRN", "-f", "2", "-o", tmp_path / "o")
    assert code == 0, err
    from ctxext.checkpoint import read_config

    assert read_config(tmp_path / "o")["rope_parameters"]["rope_type"] == "yarn"
    code, _, err = run_cli(
        capsys, "recipes", "validate", "tiny-yarn", "extend.method=YaRN", "eval.tasks=[PPL]"
    )
    assert code == 0, err


class _Counting:
    """The real tokenizer, counting the documents it is asked to tokenize."""

    def __init__(self, tok):
        self.tok, self.texts = tok, 0

    def __call__(self, text, **kwargs):
        self.texts += 1 if isinstance(text, str) else len(text)
        return self.tok(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def _bundled_docs() -> list[str]:
    from ctxext.data import EVAL_SPLITS, eval_documents, open_source

    source = open_source(None, split="heldout", default_splits=EVAL_SPLITS)
    return [d.text for d in eval_documents(source, seed=0, num_docs=None)]


def test_a_length_no_document_holds_is_refused_before_tokenizing_everything():
    from ctxext.evaluate.protocol import check_longest, tokenize_for_eval
    from ctxext.modeling import load_tokenizer

    tok = load_tokenizer(BUNDLED, False)
    texts = _bundled_docs()
    longest = 1 + max(len(ids) for ids in tokenize_for_eval(tok, texts).ids)  # BOS included
    counting = _Counting(tok)
    with pytest.raises(CtxextError) as refused:
        check_longest(counting, texts, 65536, bos=True)
    # The message says what the data supports: the longest document, measured.
    assert f"(the longest has {longest} tokens, BOS included, so lengths up to {longest} fit)" in (
        str(refused.value)
    )
    assert counting.texts < len(texts) // 2, (counting.texts, len(texts))
    # A length some document holds passes after tokenizing the longest document or two.
    counting = _Counting(tok)
    check_longest(counting, texts, longest, bos=True)
    assert counting.texts <= 2
    with pytest.raises(CtxextError):
        check_longest(_Counting(tok), texts, longest + 1, bos=True)


def test_lengths_64k_on_the_bundled_data_is_refused_before_the_full_tokenization(
    capsys, monkeypatch
):
    import ctxext.evaluate.protocol as protocol

    def whole_data(*_args, **_kwargs):
        raise AssertionError("the whole data was tokenized")

    monkeypatch.setattr(protocol, "tokenize_for_eval", whole_data)
    code, _, err = run_cli(capsys, "eval", "--lengths", "64k")
    assert code == 2 and err.count("\n") == 1, err
    assert "no document has at least 65536 tokens" in err and "so lengths up to" in err


def test_a_tokenizer_that_may_lengthen_text_is_not_bounded():
    """NFKC can turn one character into many: no shortcut, the full tokenization decides."""
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    from ctxext.evaluate.protocol import _token_bound, check_longest

    backend = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.normalizer = normalizers.NFKC()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert _token_bound(tok) is None
    check_longest(tok, ["short"], 10**6, bos=False)  # no refusal without a bound
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Strip()])
    assert _token_bound(PreTrainedTokenizerFast(tokenizer_object=backend)) is not None
