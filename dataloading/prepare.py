"""`orchestrator data prepare`: text, jsonl and parquet files -> token shards plus an index.

A document is a whole text file, one jsonl line's text field, or one parquet row's text column.
Tokens are bytes unless a tokenizer is given or trained (dataloading/tokenizer.py). The held-out
split is chosen by a stable hash: of a text file's relative path, of a record's file and number,
so the same sources always give the same split, on any machine. Shards are written as tokens
arrive: memory holds about one shard and a few MB of documents, never the corpus.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np

from common.errors import DataError
from dataloading.index import INDEX_NAME, Index, Shard, join
from dataloading.tokenizer import Encoder, find_eos, load_tokenizer, pieces, train_bpe, vocab_size_of

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git", ".venv", "node_modules"}
TOKENIZER_NAME = "tokenizer.json"
ENCODE_BATCH_BYTES = 4 << 20  # documents handed to the tokenizer at once (it encodes them in parallel)
PARQUET_BATCH_ROWS = 8192


def find_files(sources: list[str], include: list[str]) -> list[tuple[str, Path]]:
    """(relative name, path) for every matching file under the sources, sorted."""
    found: list[tuple[str, Path]] = []
    for src in sources:
        root = Path(src)
        if root.is_file():
            found.append((root.name, root))
        elif root.is_dir():
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
                for name in sorted(filenames):
                    if any(fnmatch.fnmatch(name, pat) for pat in include):
                        p = Path(dirpath) / name
                        found.append((str(p.relative_to(root)), p))
        else:
            raise DataError(f"data prepare: source not found: {src}")
    if not found:
        raise DataError(f"data prepare: no files matching {','.join(include)} under {' '.join(sources)} "
                        "(choose others with --include, e.g. '*.jsonl,*.parquet')")
    return sorted(found)


def is_val(key: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return (h % 1_000_000) < val_fraction * 1_000_000


# --- reading documents ------------------------------------------------------------------------


def jsonl_texts(path: Path, field: str) -> Iterator[tuple[int, str]]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{where}: not valid JSON ({getattr(e, 'msg', None) or e})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object with a {field!r} field, got {type(obj).__name__}")
            if field not in obj:
                has = ", ".join(map(repr, list(obj)[:10])) or "none"
                raise DataError(f"{where}: no {field!r} field (fields: {has}; choose one with --text-field)")
            text = obj[field]
            if not isinstance(text, str):
                raise DataError(f"{where}: field {field!r} is {type(text).__name__}, not a string")
            if not text.isascii():  # lone surrogates from \ud800 escapes cannot be encoded
                text = text.encode("utf-8", "replace").decode("utf-8")
            yield lineno, text


def parquet_texts(path: Path, field: str) -> Iterator[tuple[int, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise DataError(f"{path}: no column {field!r} (columns: {', '.join(names) or 'none'}; "
                        "choose one with --text-field)")
    kind = pf.schema_arrow.field(field).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or str(kind) == "string_view"):
        raise DataError(f"{path}: column {field!r} is {kind}, not text")
    row = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):  # row group by row group
        for text in batch.column(0).to_pylist():
            if text:  # nulls and empty strings are no documents
                yield row, text
            row += 1


class Documents:
    """Every document of the files as (split, document), with counts for progress lines."""

    def __init__(self, files: list[tuple[str, Path]], *, val_fraction: float, text_field: str,
                 progress_mb: float = 64.0, log=print):
        self.files, self.val_fraction, self.text_field = files, val_fraction, text_field
        self.every, self.log = max(1, int(progress_mb * 2**20)), log
        self.files_done = self.bytes_read = self.skipped = 0

    def __iter__(self) -> Iterator[tuple[str, str | bytes]]:
        self.files_done = self.bytes_read = self.skipped = 0
        self._reported = 0
        for rel, path in self.files:
            suffix = path.suffix.lower()
            if suffix in (".jsonl", ".parquet"):
                texts = jsonl_texts(path, self.text_field) if suffix == ".jsonl" else parquet_texts(path, self.text_field)
                for n, text in texts:
                    self._count(len(text))
                    yield ("val" if is_val(f"{rel}:{n}", self.val_fraction) else "train"), text
            else:
                data = path.read_bytes()
                self._count(len(data))
                if b"\x00" in data:  # binary, not text
                    self.skipped += 1
                else:
                    yield ("val" if is_val(rel, self.val_fraction) else "train"), data
            self.files_done += 1

    def _count(self, n: int) -> None:
        self.bytes_read += n
        if self.bytes_read // self.every > self._reported:  # a line per `progress_mb` read
            self._reported = self.bytes_read // self.every
            self.log(f"  {self.bytes_read / 2**20:,.0f} MB read, {self.files_done:,}/{len(self.files):,} files done")


# --- writing shards ---------------------------------------------------------------------------


class SplitWriter:
    """Documents in, shards of `per_shard` sequences out, written as soon as they are full."""

    def __init__(self, fs, root: str, split: str, encoder: Encoder, *, seq_len: int, per_shard: int):
        self.fs, self.root, self.split, self.encoder = fs, root, split, encoder
        self.seq_len, self.per_shard = seq_len, per_shard
        self.docs: list[str | bytes] = []
        self.doc_bytes = 0
        self.buf: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[Shard] = []
        self.num_docs = self.tokens = 0

    def add(self, doc: str | bytes) -> None:
        self.docs.append(doc)
        self.num_docs += 1
        self.doc_bytes += len(doc)
        if self.doc_bytes >= ENCODE_BATCH_BYTES:
            self._encode()

    def _encode(self) -> None:
        if self.docs:
            ids = self.encoder.encode(self.docs)
            self.docs, self.doc_bytes = [], 0
            self.buf.append(ids)
            self.buffered += len(ids)
            self.tokens += len(ids)
        while self.buffered >= self.per_shard * self.seq_len:
            self._write(self.per_shard)

    def _write(self, n: int) -> None:
        flat = np.concatenate(self.buf) if len(self.buf) > 1 else self.buf[0]
        block = flat[: n * self.seq_len].astype(self.encoder.dtype.newbyteorder("<"), copy=False).tobytes()
        rest = flat[n * self.seq_len :]
        self.buf, self.buffered = [rest], len(rest)
        name = f"{self.split}/{len(self.shards):05d}.bin"
        self.fs.makedirs(join(self.root, self.split), exist_ok=True)
        with self.fs.open(join(self.root, name), "wb") as f:
            f.write(block)
        self.shards.append(Shard(name, n, len(block), hashlib.sha256(block).hexdigest()))

    def finish(self) -> list[Shard]:
        self._encode()
        n = self.buffered // self.seq_len  # the tail shorter than one sequence is dropped
        if n:
            self._write(n)
        if not self.shards:
            raise DataError(f"data prepare: split {self.split!r} has {self.tokens} tokens, "
                            f"less than one sequence of {self.seq_len}")
        return self.shards


# --- the command ------------------------------------------------------------------------------


def prepare(
    sources: list[str],
    out: str,
    *,
    seq_len: int = 129,
    val_fraction: float = 0.01,
    include: list[str] = ("*.py", "*.txt", "*.md", "*.rst"),
    shard_mb: float = 16.0,
    text_field: str = "text",
    tokenizer: str | None = None,
    train_tokenizer: int | None = None,
    eos: str | None = None,
    progress_mb: float = 64.0,
    log=print,
) -> Index:
    if seq_len < 2:
        raise DataError(f"data prepare: --seq-len must be at least 2, got {seq_len}")
    if not 0 < val_fraction < 1:
        raise DataError(f"data prepare: --val-fraction must be between 0 and 1, got {val_fraction}")
    if tokenizer and train_tokenizer is not None:
        raise DataError("data prepare: give --tokenizer or --train-tokenizer, not both")
    if eos is not None and not tokenizer and train_tokenizer is None:
        raise DataError("data prepare: --eos needs --tokenizer or --train-tokenizer "
                        "(byte tokens separate documents by a newline)")
    tok = load_tokenizer(tokenizer) if tokenizer else None  # fail on a bad tokenizer before reading anything
    docs = Documents(find_files(sources, list(include)), val_fraction=val_fraction, text_field=text_field,
                     progress_mb=progress_mb, log=log)
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    meta = None
    if train_tokenizer is not None:
        tok = _train(docs, train_tokenizer, log=log)
    if tok is not None:
        meta = _save_tokenizer(fs, root, tok, eos, source=tokenizer or "trained", log=log)
    encoder = Encoder(tok, eos=meta["eos_id"] if meta else None)
    per_shard = max(1, int(shard_mb * 2**20) // (seq_len * encoder.dtype.itemsize))
    writers = {s: SplitWriter(fs, root, s, encoder, seq_len=seq_len, per_shard=per_shard)
               for s in ("train", "val")}
    pending = None  # the last train document: it goes to val if nothing else does
    for split, doc in docs:
        if split == "val":
            writers["val"].add(doc)
        else:
            if pending is not None:
                writers["train"].add(pending)
            pending = doc
    if pending is None and not writers["val"].num_docs:
        raise DataError(f"data prepare: no text in the inputs ({len(docs.files)} files, all empty or binary)")
    if pending is not None:
        to_val = not writers["val"].num_docs and writers["train"].num_docs
        writers["val" if to_val else "train"].add(pending)  # never leave eval without data
    splits = {}
    for split, w in writers.items():
        splits[split] = w.finish()
        n = sum(s.num_sequences for s in splits[split])
        log(f"{split}: {w.num_docs:,} documents, {w.tokens:,} tokens -> {n:,} sequences of {seq_len} "
            f"in {len(splits[split])} shards")
    index = Index(out, encoder.dtype.name, seq_len, encoder.vocab_size, splits, tokenizer=meta)
    with fs.open(join(root, INDEX_NAME), "w") as f:  # last: the dataset exists from here on
        f.write(index.to_json())
    if docs.skipped:
        log(f"skipped {docs.skipped} files that look binary (contain NUL bytes)")
    log(f"wrote {join(out, INDEX_NAME)}")
    return index


def _train(docs: Documents, vocab_size: int, *, log):
    """Train a byte-level BPE on the train split's documents (held-out text stays unseen)."""
    seen = [0]

    def batches():
        batch, size = [], 0
        for split, doc in docs:
            if split == "train":
                batch.extend(pieces(doc.decode("utf-8", errors="replace") if isinstance(doc, bytes) else doc))
                size += len(doc)
                seen[0] += len(doc)
                if size >= ENCODE_BATCH_BYTES:
                    yield batch
                    batch, size = [], 0
        if batch:
            yield batch

    log(f"training a byte-level BPE tokenizer, vocabulary {vocab_size:,}")
    tok = train_bpe(batches(), vocab_size)
    log(f"  trained on {seen[0] / 2**20:,.1f} MB of train documents: {tok.get_vocab_size():,} tokens")
    return tok


def _save_tokenizer(fs, root: str, tok, eos: str | None, *, source: str, log) -> dict:
    """Writes tokenizer.json next to the shards, so the dataset carries what decodes it."""
    eos_id = find_eos(tok, eos)
    text = tok.to_str()
    with fs.open(join(root, TOKENIZER_NAME), "w") as f:
        f.write(text)
    vocab = vocab_size_of(tok)
    sep = (f"EOS {tok.id_to_token(eos_id)!r} (id {eos_id})" if eos_id is not None
           else "no EOS token: documents run together (choose one with --eos)")
    log(f"tokenizer: vocabulary {vocab:,}, {sep}")
    return {"path": TOKENIZER_NAME, "source": source, "vocab_size": vocab, "eos_id": eos_id,
            "sha256": hashlib.sha256(text.encode()).hexdigest()}
