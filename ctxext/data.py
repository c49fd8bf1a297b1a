"""Document sources shared by evaluation and fine-tuning.

A *source* is one string, resolved in this order:

* ``None`` or ``"stdlib"``: the default corpus (the Python standard library's sources), the part
  given by ``split`` (``"heldout"`` for evaluation, ``"train"`` for fine-tuning).
* an existing path:
    - a folder: every regular file below it (recursive, sorted by relative path) is one
      document; hidden files/folders (name starting with ``.``) and binary files (a NUL byte in
      the first 8 KiB) are skipped; a non-UTF-8 text file is an error naming the file;
    - a ``.jsonl`` file: one JSON object per line, its ``text_field`` is one document;
    - a ``.json`` file: a list of strings or of objects with ``text_field``, or one such object;
    - any other file: the whole file is one document.
  Files must be UTF-8; with ``fallback_encoding`` (e.g. ``"latin-1"``, which never fails) a file
  that is not valid UTF-8 is decoded with it instead (older corpora such as NLTK's Gutenberg mix
  both). The fingerprint covers the decoded text, so such results stay traceable.
* otherwise a Hugging Face dataset, loaded with ``datasets.load_dataset``, written
  ``NAME[:CONFIG][@SPLIT]`` (e.g. ``pg19``, ``wikitext:wikitext-103-raw-v1@test``). ``SPLIT``
  defaults to ``dataset_split``. It must already be in the local cache when there is no network
  (set ``HF_HUB_OFFLINE=1`` to skip network look-ups).

Documents whose text is empty or only whitespace are dropped; no documents at all is an error.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ctxext.corpus import Document, Split, stdlib_documents
from ctxext.errors import CtxextError

__all__ = [
    "Document",
    "data_fingerprint",
    "load_documents",
    "parse_dataset_spec",
    "tokenize_documents",
]

_BINARY_SNIFF_BYTES = 8192
# Suffixes that can only mean "a file I meant to pass", so a missing one is a path error rather
# than an attempt to reach the Hugging Face Hub.
_FILE_SUFFIXES = {".txt", ".text", ".md", ".jsonl", ".json", ".py", ".rst", ".csv"}


def load_documents(
    source: str | None,
    *,
    split: Split = "heldout",
    text_field: str = "text",
    dataset_split: str = "test",
    fallback_encoding: str | None = None,
) -> list[Document]:
    """Resolve ``source`` (see the module docstring) into a non-empty list of documents."""
    if source is None or source == "stdlib":
        docs = list(stdlib_documents(split))
        what = f"the stdlib corpus ({split} part)"
    else:
        path = Path(source).expanduser()
        if path.exists():
            docs = _load_path(path, text_field, fallback_encoding)
            what = str(path)
        elif _looks_like_path(source):
            raise CtxextError(f"data path {source} does not exist; check the path")
        else:
            docs = _load_hf_dataset(source, text_field, dataset_split)
            what = f"dataset {source}"
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise CtxextError(f"no text found in {what}; pass a source with non-empty documents")
    return docs


def _looks_like_path(source: str) -> bool:
    """A missing path the user obviously meant as one (not a Hub dataset id)."""
    return (
        source.startswith(("/", "./", "../", "~", "\\"))
        or Path(source).suffix.lower() in _FILE_SUFFIXES
        or source.count("/") > 1  # Hub ids are NAME or ORG/NAME
    )


def _load_path(path: Path, text_field: str, fallback: str | None) -> list[Document]:
    if path.is_dir():
        return _load_folder(path, fallback)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _load_jsonl(path, text_field, fallback)
    if suffix == ".json":
        return _load_json(path, text_field, fallback)
    return [Document(name=path.name, text=_read_text(path, fallback))]


def _read_text(path: Path, fallback: str | None) -> str:
    """Text of a file (UTF-8, else ``fallback``); binary or undecodable files name the file."""
    data = path.read_bytes()
    if _is_binary(data):
        raise CtxextError(f"{path} is a binary file, not text; pass UTF-8 text files")
    try:
        # utf-8-sig drops a byte-order mark, which would otherwise become a stray token.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if fallback is None:
            raise CtxextError(
                f"{path} is not valid UTF-8 (byte {e.start}); convert it (iconv -f LATIN1 -t "
                "UTF-8) or accept another encoding for such files (--fallback-encoding latin-1)"
            ) from None
        position = e.start
    try:
        return data.decode(fallback)
    except (UnicodeDecodeError, LookupError) as e:
        raise CtxextError(
            f"{path} is neither UTF-8 (byte {position}) nor {fallback} ({e}); convert it to UTF-8"
        ) from None


def _is_binary(data: bytes) -> bool:
    # The heuristic git and grep use: text files never contain NUL bytes.
    return b"\x00" in data[:_BINARY_SNIFF_BYTES]


def _load_folder(folder: Path, fallback: str | None) -> list[Document]:
    docs = []
    for path in sorted(folder.rglob("*"), key=lambda p: p.relative_to(folder).as_posix()):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        with path.open("rb") as f:
            if _is_binary(f.read(_BINARY_SNIFF_BYTES)):
                continue  # images, archives, .pyc files: not documents
        docs.append(Document(name=rel.as_posix(), text=_read_text(path, fallback)))
    return docs


def _load_jsonl(path: Path, text_field: str, fallback: str | None) -> list[Document]:
    docs = []
    for lineno, line in enumerate(_read_text(path, fallback).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CtxextError(
                f"{path} line {lineno} is not valid JSON ({e.msg}); write one JSON object per line"
            ) from None
        text = _field(record, text_field, f"{path} line {lineno}")
        docs.append(Document(name=f"{path.name}:{lineno}", text=text))
    return docs


def _load_json(path: Path, text_field: str, fallback: str | None) -> list[Document]:
    try:
        data = json.loads(_read_text(path, fallback))
    except json.JSONDecodeError as e:
        raise CtxextError(
            f"{path} is not valid JSON (line {e.lineno}: {e.msg}); fix the file or use .jsonl"
        ) from None
    records = data if isinstance(data, list) else [data]
    docs = []
    for i, record in enumerate(records):
        text = record if isinstance(record, str) else _field(record, text_field, f"{path} item {i}")
        docs.append(Document(name=f"{path.name}[{i}]", text=text))
    return docs


def _field(record: Any, text_field: str, where: str) -> str:
    """The text of one record, or an error saying exactly which record is wrong."""
    if not isinstance(record, dict) or text_field not in record:
        keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise CtxextError(
            f"{where} has no '{text_field}' field (found: {keys}); "
            "add it or choose the field with --text-field"
        )
    text = record[text_field]
    if not isinstance(text, str):
        raise CtxextError(
            f"{where}: '{text_field}' is a {type(text).__name__}, not a string; store the text there"
        )
    return text


def parse_dataset_spec(spec: str, default_split: str) -> tuple[str, str | None, str]:
    """``NAME[:CONFIG][@SPLIT]`` -> (name, config or None, split)."""
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    if not name:
        raise CtxextError(f"'{spec}' names no dataset; write NAME[:CONFIG][@SPLIT]")
    return name, config or None, split or default_split


def _load_hf_dataset(spec: str, text_field: str, default_split: str) -> list[Document]:
    name, config, split = parse_dataset_spec(spec, default_split)
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name, bad config/split: all the same to the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CtxextError(
            f"could not load '{spec}' as a local path (none exists) or as a Hugging Face dataset "
            f"(offline or unknown: {reason}); download it once with network and set "
            "HF_HUB_OFFLINE=1, or pass a local text file, folder or .jsonl file"
        ) from None
    if text_field not in ds.column_names:
        raise CtxextError(
            f"dataset '{spec}' has no '{text_field}' column (columns: "
            f"{', '.join(ds.column_names)}); choose one with --text-field"
        )
    return [
        Document(name=f"{name}[{split}]#{i}", text=text)
        for i, text in enumerate(ds[text_field])
        if isinstance(text, str)
    ]


def tokenize_documents(tokenizer: Any, docs: Sequence[Document]) -> list[list[int]]:
    """Token ids of each document, without special tokens (the evaluator adds BOS itself)."""
    if not docs:
        return []
    # verbose=False: long documents are the point here, so silence the "longer than the
    # specified maximum sequence length" warning.
    enc = tokenizer([d.text for d in docs], add_special_tokens=False, verbose=False)
    return [list(ids) for ids in enc["input_ids"]]


def data_fingerprint(docs: Iterable[Document]) -> str:
    """A short sha256 over names and texts: identical data gives identical fingerprints."""
    h = hashlib.sha256()
    for doc in docs:
        for part in (doc.name, doc.text):
            b = part.encode("utf-8")
            # Length-prefixing makes the encoding unambiguous (no two lists hash the same input).
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()[:16]
