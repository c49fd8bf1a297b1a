"""Document sources: every kind, every error, the Gutenberg folder when present."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctxext import data
from ctxext.corpus import Document
from ctxext.data import (
    TRAIN_SPLITS,
    data_fingerprint,
    eval_documents,
    load_documents,
    open_source,
    parse_dataset_spec,
    tokenize_documents,
)
from ctxext.errors import CtxextError

GUTENBERG = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "gutenberg"


# --- sources ---------------------------------------------------------------------------------


def test_stdlib_default_is_heldout():
    heldout = load_documents(None)
    assert heldout == load_documents("stdlib")
    assert len(heldout) > 10
    assert all(d.name.endswith(".py") and d.text.strip() for d in heldout)
    train_names = {d.name for d in load_documents(None, split="train")}
    assert not train_names & {d.name for d in heldout}


def test_text_file_is_one_document(tmp_path):
    f = tmp_path / "book.txt"
    f.write_bytes("\ufeffCall me Ishmael.\n\fChapter 2\n".encode())  # BOM dropped, \f kept
    assert load_documents(str(f)) == [Document("book.txt", "Call me Ishmael.\n\fChapter 2\n")]


def test_folder_recursive_sorted_skips_hidden_and_binary(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.md").write_text("zed")
    (tmp_path / "a.txt").write_text("ay")
    (tmp_path / "c.py").write_text("print(1)")
    (tmp_path / "empty.txt").write_text("  \n")  # whitespace only: dropped
    (tmp_path / ".hidden.txt").write_text("secret")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("[core]")
    (tmp_path / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    docs = load_documents(str(tmp_path))
    assert [d.name for d in docs] == ["a.txt", "b/z.md", "c.py"]
    assert docs[1].text == "zed"


def test_jsonl(tmp_path):
    f = tmp_path / "d.jsonl"
    rows = [{"text": "one", "id": 1}, {"text": ""}, {"body": "x", "text": "three"}]
    f.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")
    docs = load_documents(str(f))
    assert [(d.name, d.text) for d in docs] == [("d.jsonl:1", "one"), ("d.jsonl:4", "three")]


def test_jsonl_other_field(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"body": "hello"}) + "\n")
    assert [d.text for d in load_documents(str(f), text_field="body")] == ["hello"]


@pytest.mark.parametrize(
    "payload, texts",
    [
        (["a", "b"], ["a", "b"]),
        ([{"text": "a"}, {"text": "b"}], ["a", "b"]),
        ({"text": "only"}, ["only"]),
    ],
)
def test_json(tmp_path, payload, texts):
    f = tmp_path / "d.json"
    f.write_text(json.dumps(payload))
    assert [d.text for d in load_documents(str(f))] == texts


def write_dataset(folder: Path, splits: dict[str, list[str]], field: str = "text") -> Path:
    """A local dataset folder as `datasets` reads a Hub repo: one .jsonl file per split."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, texts in splits.items():
        lines = [json.dumps({field: t, "n": i}) for i, t in enumerate(texts)]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


SPLITS = {
    "train": [f"train doc {i}" for i in range(40)],
    "validation": ["valid doc 0", "", "valid doc 2"],
    "test": ["test doc 0", "test doc 1"],
}


def test_dataset_folder_is_streamed_through_datasets_with_default_splits(tmp_path):
    folder = write_dataset(tmp_path / "books", SPLITS)
    train = open_source(str(folder), default_splits=TRAIN_SPLITS)
    assert train.streamed and train.split == "train"
    assert [d.text for d in train.all_documents()] == SPLITS["train"]
    # Evaluation reads test, else validation; empty records are dropped; names carry the split.
    docs = load_documents(str(folder))
    assert [d.text for d in docs] == SPLITS["test"]
    assert docs[0].name == f"{folder}[test]#0"
    no_test = write_dataset(tmp_path / "no-test", {k: SPLITS[k] for k in ("train", "validation")})
    assert [d.text for d in load_documents(str(no_test))] == ["valid doc 0", "valid doc 2"]
    assert load_documents(str(no_test), dataset_split="train")[0].text == "train doc 0"
    only_train = write_dataset(tmp_path / "only-train", {"train": SPLITS["train"]})
    with pytest.raises(CtxextError, match=r"no test or validation split \(it has: train\)"):
        load_documents(str(only_train))
    with pytest.raises(CtxextError, match=r"no split 'dev' \(it has: "):
        load_documents(str(folder), dataset_split="dev")
    with pytest.raises(CtxextError, match=r"record 0 has no 'body' field \(found: text, n\)"):
        load_documents(str(folder), text_field="body")


def test_streamed_walk_is_a_seeded_permutation(tmp_path):
    source = open_source(str(write_dataset(tmp_path / "d", SPLITS)), default_splits=TRAIN_SPLITS)
    first = [d.text for d in source.walk(seed=1, buffer_size=8)]
    assert first == [d.text for d in source.walk(seed=1, buffer_size=8)]
    assert first != [d.text for d in source.walk(seed=2, buffer_size=8)]
    assert first != SPLITS["train"] and sorted(first) == sorted(SPLITS["train"])


def test_eval_walks_a_stream_until_it_has_num_docs_long_enough(tmp_path):
    texts = [("long " * 50 if i % 3 == 0 else "short") + f" {i}" for i in range(60)]
    source = open_source(str(write_dataset(tmp_path / "d", {"test": texts})))
    seen = []

    def long_enough(doc):
        seen.append(doc.text)
        return doc.text.startswith("long")

    docs = eval_documents(source, seed=3, num_docs=4, long_enough=long_enough)
    assert len(docs) == 4 and all(d.text.startswith("long") for d in docs)
    assert seen[-1] == docs[-1].text and len(seen) < len(texts)  # stopped at the 4th
    assert docs == eval_documents(source, seed=3, num_docs=4, long_enough=long_enough)
    assert [d.text for d in eval_documents(source, seed=3, num_docs=None)] == texts


def test_parquet_and_large_jsonl_files_are_streamed(tmp_path, monkeypatch):
    import datasets

    pq = tmp_path / "docs.parquet"
    datasets.Dataset.from_dict({"text": ["a", "b"]}).to_parquet(str(pq))
    source = open_source(str(pq))
    assert source.streamed and source.split is None
    assert [d.text for d in source.all_documents()] == ["a", "b"]
    jsonl = tmp_path / "big.jsonl"
    jsonl.write_text('{"text": "x"}\n{"text": "y"}\n')
    assert not open_source(str(jsonl)).streamed  # small: read as before
    monkeypatch.setattr(data, "LARGE_FILE_BYTES", 10)
    source = open_source(str(jsonl))
    assert source.streamed and [d.text for d in source.all_documents()] == ["x", "y"]


def test_dataset_config_given_twice_must_agree():
    with pytest.raises(CtxextError, match="give it once"):
        open_source("wikitext:a", dataset_config="b")


def test_parse_dataset_spec():
    assert parse_dataset_spec("a", "test") == ("a", None, "test")
    assert parse_dataset_spec("o/a:c", "test") == ("o/a", "c", "test")
    assert parse_dataset_spec("o/a@train", "test") == ("o/a", None, "train")
    with pytest.raises(CtxextError):
        parse_dataset_spec("@train", "test")


def test_hf_dataset_unavailable_offline(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nope/nope' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(CtxextError) as e:
        load_documents("nope/nope")
    msg = str(e.value)
    assert "\n" not in msg and "HF_HUB_OFFLINE" in msg and "local" in msg


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["./missing.txt", "no/such/dir", "missing.jsonl", "/nope"])
def test_missing_path(source):
    with pytest.raises(CtxextError, match="does not exist"):
        load_documents(source)


def test_empty_sources(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    (tmp_path / "dir").mkdir()
    for name in ("empty.txt", "blank.jsonl", "dir"):
        with pytest.raises(CtxextError, match="no text found"):
            load_documents(str(tmp_path / name))


def test_binary_file(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"\x00\x01\x02binary")
    with pytest.raises(CtxextError, match=r"model\.bin is a binary file"):
        load_documents(str(f))


def test_non_utf8_file_named_also_inside_folder(tmp_path):
    (tmp_path / "ok.txt").write_text("fine")
    (tmp_path / "latin.txt").write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(CtxextError, match=r"latin\.txt is not valid UTF-8 \(byte 3\)"):
        load_documents(str(tmp_path / "latin.txt"))
    with pytest.raises(CtxextError, match=r"latin\.txt is not valid UTF-8"):
        load_documents(str(tmp_path))
    docs = load_documents(str(tmp_path), fallback_encoding="latin-1")
    assert [d.text for d in docs] == ["café au lait", "fine"]
    with pytest.raises(CtxextError, match=r"neither UTF-8 .* nor no-such-codec"):
        load_documents(str(tmp_path), fallback_encoding="no-such-codec")


def test_jsonl_errors_give_line_numbers(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(CtxextError, match="line 2 is not valid JSON"):
        load_documents(str(f))
    f.write_text('{"text": "ok"}\n\n{"content": "x"}\n')
    with pytest.raises(CtxextError, match=r"line 3 has no 'text' field \(found: content\)"):
        load_documents(str(f))
    f.write_text('{"text": 5}\n')
    with pytest.raises(CtxextError, match="line 1: 'text' is a int, not a string"):
        load_documents(str(f))
    f.write_text('["not", "an", "object"]\n')
    with pytest.raises(CtxextError, match="line 1 has no 'text' field"):
        load_documents(str(f))


def test_json_error(tmp_path):
    f = tmp_path / "d.json"
    f.write_text("[1, 2")
    with pytest.raises(CtxextError, match="not valid JSON"):
        load_documents(str(f))


# --- tokenization and fingerprint ------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from ctxext.bundled_train import train_tokenizer

    return train_tokenizer(["hello world, the quick brown fox jumps over the lazy dog"] * 5, 300)


def test_tokenize_documents_without_special_tokens(tokenizer):
    docs = [Document("a", "hello world"), Document("b", "the lazy dog " * 400)]
    ids = tokenize_documents(tokenizer, docs)
    assert len(ids) == 2 and len(ids[1]) > tokenizer.model_max_length  # no truncation
    assert tokenizer.bos_token_id not in ids[0]
    assert tokenizer.decode(ids[0]) == "hello world"
    assert tokenize_documents(tokenizer, []) == []


def test_fingerprint():
    a = [Document("x", "ab"), Document("y", "c")]
    assert data_fingerprint(a) == data_fingerprint(list(a))
    assert len(data_fingerprint(a)) == 16
    assert data_fingerprint(a) != data_fingerprint([Document("x", "a"), Document("y", "bc")])
    assert data_fingerprint(a) != data_fingerprint([Document("z", "ab"), Document("y", "c")])
    assert data_fingerprint(a) != data_fingerprint(a[::-1])


# --- the shared Gutenberg books --------------------------------------------------------------


@pytest.mark.skipif(not GUTENBERG.is_dir(), reason="no ../shared/corpus/gutenberg here")
def test_gutenberg_folder(tokenizer):
    # Two of the books (chesterton-ball, shakespeare-caesar) are Latin-1, as NLTK ships them.
    with pytest.raises(CtxextError, match=r"chesterton-ball\.txt is not valid UTF-8"):
        load_documents(str(GUTENBERG))
    docs = load_documents(str(GUTENBERG), fallback_encoding="latin-1")
    books = [d for d in docs if d.name.endswith(".txt")]
    assert len(books) == 23
    assert [d.name for d in docs] == sorted(d.name for d in docs)
    assert min(len(d.text) for d in books) > 30_000
    one = load_documents(str(GUTENBERG / "blake-poems.txt"))
    assert one[0].text == next(d.text for d in books if d.name == "blake-poems.txt")
    assert len(data_fingerprint(docs)) == 16
    ids = tokenize_documents(tokenizer, one)
    assert len(ids[0]) > 10_000  # one long document, not split
