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
* a Hugging Face dataset, read with ``datasets`` in streaming mode (nothing is downloaded
  whole, nothing is held but the documents a run takes):
    - a name that is no existing path, written ``NAME[:CONFIG][@SPLIT]`` (e.g. ``pg19``,
      ``wikitext:wikitext-103-raw-v1@test``); ``--dataset-config``/``--dataset-split`` say the
      same. It must already be in the local cache when there is no network (set
      ``HF_HUB_OFFLINE=1`` to skip network look-ups);
    - a folder that holds only data files (``.jsonl``, ``.parquet``, ``.csv``, ``.arrow``,
      besides a README.md): a local dataset, its splits named by its files (``train.jsonl``,
      ``test.jsonl``, ``data/validation-*.parquet``, ...), as ``datasets`` reads a Hub repo;
    - a ``.parquet`` file, or a ``.jsonl`` file of more than ``LARGE_FILE_BYTES``.

  Without a split, fine-tuning reads ``train`` and evaluation ``test`` (else ``validation``).
  Training walks a dataset in a seeded buffered shuffle (``IterableDataset.shuffle(seed,
  buffer_size)``) and stops at the tokens it needs; evaluation walks it in a seeded order until
  it has ``--num-docs`` documents long enough (see :func:`eval_documents`).

Documents whose text is empty or only whitespace are dropped; no documents at all is an error.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctxext.corpus import Document, Split, stdlib_documents
from ctxext.errors import CtxextError

__all__ = [
    "DEFAULT_SHUFFLE_BUFFER",
    "EVAL_SPLITS",
    "TRAIN_SPLITS",
    "Document",
    "Fingerprint",
    "Source",
    "data_fingerprint",
    "eval_documents",
    "load_documents",
    "open_source",
    "parse_dataset_spec",
    "tokenize_documents",
]

#: Documents held by a streamed dataset's shuffle buffer. Documents can be whole books: 64
#: Gutenberg books (about 0.4 MB each) cost about 120 MB of RSS, 256 of them 420 MB
#: (benchmarks/bench_data.py); the shards of a Hub dataset are shuffled as well.
DEFAULT_SHUFFLE_BUFFER = 64
#: Local .jsonl files above this are streamed through ``datasets`` instead of read whole.
LARGE_FILE_BYTES = 256 * 2**20
#: The split a command reads when none is given: the first of these the dataset has.
TRAIN_SPLITS = ("train",)
EVAL_SPLITS = ("test", "validation")
# File suffix -> the ``datasets`` builder that streams it.
_DATASET_BUILDERS = {".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}

_BINARY_SNIFF_BYTES = 8192
# Suffixes that can only mean "a file I meant to pass", so a missing one is a path error rather
# than an attempt to reach the Hugging Face Hub.
_FILE_SUFFIXES = {".txt", ".text", ".md", ".jsonl", ".json", ".py", ".rst", ".csv"}


@dataclass
class Source:
    """An opened document source: a list (small local sources, the stdlib corpus) or a
    streamed ``datasets.IterableDataset``, with what to call it and the split it reads."""

    what: str
    split: str | None = None
    documents: list[Document] | None = None
    dataset: Any | None = None  # datasets.IterableDataset
    text_field: str = "text"

    @property
    def streamed(self) -> bool:
        return self.dataset is not None

    def walk(self, seed: int, buffer_size: int = DEFAULT_SHUFFLE_BUFFER) -> Iterator[Document]:
        """The streamed documents in a seeded order (a shuffle buffer of ``buffer_size``)."""
        assert self.dataset is not None, "walk() is for streamed sources"
        shuffled = self.dataset.shuffle(seed=seed, buffer_size=buffer_size)
        return self._documents(shuffled)

    def all_documents(self) -> list[Document]:
        """Every non-empty document, in the source's own order."""
        if self.documents is not None:
            return self.documents
        return _non_empty(list(self._documents(self.dataset)), self.what)

    def _documents(self, dataset: Any) -> Iterator[Document]:
        prefix = f"{self.what}[{self.split}]" if self.split else self.what
        for i, record in enumerate(dataset):
            if isinstance(record, dict) and record.get(self.text_field, "") is None:
                continue  # a null text (nullable columns): no document
            text = _field(record, self.text_field, f"{self.what} record {i}")
            if text.strip():
                yield Document(name=f"{prefix}#{i}", text=text)


def load_documents(
    source: str | None,
    *,
    split: Split = "heldout",
    text_field: str = "text",
    dataset_config: str | None = None,
    dataset_split: str | None = None,
    fallback_encoding: str | None = None,
) -> list[Document]:
    """Resolve ``source`` (see the module docstring) into a non-empty list of documents."""
    defaults = TRAIN_SPLITS if split == "train" else EVAL_SPLITS
    opened = open_source(
        source,
        split=split,
        text_field=text_field,
        dataset_config=dataset_config,
        dataset_split=dataset_split,
        default_splits=defaults,
        fallback_encoding=fallback_encoding,
    )
    return opened.all_documents()


def open_source(
    source: str | None,
    *,
    split: Split = "heldout",
    text_field: str = "text",
    dataset_config: str | None = None,
    dataset_split: str | None = None,
    default_splits: tuple[str, ...] = EVAL_SPLITS,
    fallback_encoding: str | None = None,
) -> Source:
    """Open ``source`` (see the module docstring): small local sources are read now, datasets
    are only opened (a streamed dataset reads nothing until it is walked)."""
    if source is None or source == "stdlib":
        docs = list(stdlib_documents(split))
        return Source(f"the stdlib corpus ({split} part)", documents=_non_empty(docs, "stdlib"))
    path = Path(source).expanduser()
    if path.exists():
        builder = _dataset_builder(path)
        if builder is None:
            docs = _load_path(path, text_field, fallback_encoding)
            return Source(str(path), documents=_non_empty(docs, str(path)))
        if path.is_dir():
            name, config, chosen = str(path), dataset_config, dataset_split
            return _open_dataset(source, name, config, chosen, default_splits, text_field)
        dataset = _stream(source, builder, None, "train", data_files=str(path))
        return Source(str(path), dataset=dataset, text_field=text_field)
    if _looks_like_path(source):
        raise CtxextError(f"data path {source} does not exist; check the path")
    name, config, chosen = parse_dataset_spec(source, dataset_split)
    if dataset_config is not None and config is not None and dataset_config != config:
        raise CtxextError(
            f"'{source}' names config '{config}' but --dataset-config is '{dataset_config}'; "
            "give it once"
        )
    return _open_dataset(source, name, config or dataset_config, chosen, default_splits, text_field)


def _non_empty(docs: list[Document], what: str) -> list[Document]:
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise CtxextError(f"no text found in {what}; pass a source with non-empty documents")
    return docs


def _dataset_builder(path: Path) -> str | None:
    """The ``datasets`` builder for a local path that is a dataset (module docstring), or None.

    A folder qualifies when every file in it (hidden files and a README.md aside) is a data
    file of one kind; a file when it is .parquet, or .jsonl and large.
    """
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".parquet" or (suffix == ".jsonl" and path.stat().st_size > LARGE_FILE_BYTES):
            return _DATASET_BUILDERS[suffix]
        return None
    files = [
        p
        for p in path.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
        and p.name.lower() != "readme.md"
    ]
    kinds = {_DATASET_BUILDERS.get(p.suffix.lower()) for p in files}
    if len(kinds) == 1 and None not in kinds:
        return kinds.pop()
    return None


def _open_dataset(
    spec: str,
    name: str,
    config: str | None,
    split: str | None,
    default_splits: tuple[str, ...],
    text_field: str,
) -> Source:
    """Open a Hub (or local-folder) dataset for streaming, choosing the split to read."""
    splits = _stream(spec, name, config, None)
    available = list(splits)
    if split is None:
        split = next((s for s in default_splits if s in available), None)
        if split is None:
            raise CtxextError(
                f"dataset '{spec}' has no {' or '.join(default_splits)} split (it has: "
                f"{', '.join(available)}); choose one with --dataset-split"
            )
    elif split not in available:
        raise CtxextError(
            f"dataset '{spec}' has no split '{split}' (it has: {', '.join(available)}); "
            "choose one with --dataset-split"
        )
    return Source(spec, split=split, dataset=splits[split], text_field=text_field)


def _stream(spec: str, name: str, config: str | None, split: str | None, **kwargs: Any) -> Any:
    """``datasets.load_dataset(..., streaming=True)``, its failures as one line."""
    try:
        import datasets

        return datasets.load_dataset(name, config, split=split, streaming=True, **kwargs)
    except Exception as e:  # offline, unknown name, bad config/split: all the same to the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CtxextError(
            f"could not open '{spec}' as a Hugging Face dataset ({reason}); check the name and "
            "--dataset-config, download it once with network and set HF_HUB_OFFLINE=1, or pass "
            "a local text file, folder or .jsonl file"
        ) from None


def eval_documents(
    source: Source,
    *,
    seed: int,
    num_docs: int | None,
    long_enough: Callable[[Document], bool] | None = None,
    buffer_size: int = DEFAULT_SHUFFLE_BUFFER,
) -> list[Document]:
    """The documents evaluation scores.

    A list source gives all its documents (the evaluator samples ``num_docs`` of them with the
    seed). A streamed dataset is walked in a seeded order until ``num_docs`` documents pass
    ``long_enough`` (all of the split without ``num_docs``): a large test split is never read
    whole to score a few documents.
    """
    if not source.streamed or num_docs is None:
        return source.all_documents()
    kept: list[Document] = []
    for doc in source.walk(seed, buffer_size):
        if long_enough is None or long_enough(doc):
            kept.append(doc)
            if len(kept) == num_docs:
                break
    if not kept:
        raise CtxextError(
            f"no document of {source.what} is long enough for the longest length; pass shorter "
            "--lengths or other data"
        )
    return kept


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


def parse_dataset_spec(spec: str, default_split: str | None) -> tuple[str, str | None, str | None]:
    """``NAME[:CONFIG][@SPLIT]`` -> (name, config or None, split)."""
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    if not name:
        raise CtxextError(f"'{spec}' names no dataset; write NAME[:CONFIG][@SPLIT]")
    return name, config or None, split or default_split


def tokenize_documents(tokenizer: Any, docs: Sequence[Document]) -> list[list[int]]:
    """Token ids of each document, without special tokens (the evaluator adds BOS itself)."""
    if not docs:
        return []
    # verbose=False: long documents are the point here, so silence the "longer than the
    # specified maximum sequence length" warning.
    enc = tokenizer([d.text for d in docs], add_special_tokens=False, verbose=False)
    return [list(ids) for ids in enc["input_ids"]]


class Fingerprint:
    """A short sha256 over documents' names and texts, fed one document at a time."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, doc: Document) -> None:
        for part in (doc.name, doc.text):
            b = part.encode("utf-8")
            # Length-prefixing makes the encoding unambiguous (no two lists hash the same input).
            self._h.update(len(b).to_bytes(8, "little"))
            self._h.update(b)

    def hexdigest(self) -> str:
        return self._h.hexdigest()[:16]


def data_fingerprint(docs: Iterable[Document]) -> str:
    """A short sha256 over names and texts: identical data gives identical fingerprints."""
    fingerprint = Fingerprint()
    for doc in docs:
        fingerprint.update(doc)
    return fingerprint.hexdigest()
