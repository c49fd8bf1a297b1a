"""Document sources: every kind, every error, the Gutenberg folder when present."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctxext.corpus import Document
from ctxext.data import (
    data_fingerprint,
    load_documents,
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


def test_hf_dataset_spec_and_loading(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": ["first doc", "", "second"], "n": [1, 2, 3]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    docs = load_documents("org/books:full@validation")
    assert calls == [("org/books", "full", "validation")]
    assert [d.text for d in docs] == ["first doc", "second"]
    assert docs[0].name == "org/books[validation]#0"
    load_documents("pg19", dataset_split="train")
    assert calls[-1] == ("pg19", None, "train")
    with pytest.raises(CtxextError, match=r"no 'body' column \(columns: text, n\)"):
        load_documents("pg19", text_field="body")


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
