"""The on-storage format of a token dataset.

    URI/index.json            written last: a dataset exists once its index does
    URI/<split>/<NNNNN>.bin   fixed-length sequences of `seq_len` tokens, back to back

index.json: {"format", "version", "dtype", "seq_len", "vocab_size",
             "splits": {"train": {"num_sequences", "shards": [{"name", "num_sequences", "bytes", "sha256"}]}},
             "tokenizer": {"path", "source", "vocab_size", "eos_id", "sha256"}}   (tokenizer: only when not bytes)

Tokens are unsigned little-endian integers: `dtype` is uint8, uint16 or uint32, wide enough for
`vocab_size` (the model's embedding rows).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import fsspec
import numpy as np

from common.errors import DataError

FORMAT = "orchestrator-tokens"
VERSION = 1
INDEX_NAME = "index.json"
DTYPES = {"uint8": 1 << 8, "uint16": 1 << 16, "uint32": 1 << 32}  # token dtype -> ids it can hold


def token_dtype(name: str) -> np.dtype:
    """The numpy dtype of stored tokens: little-endian whatever the machine."""
    return np.dtype(name).newbyteorder("<")


@dataclass(frozen=True)
class Shard:
    name: str
    num_sequences: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Index:
    uri: str
    dtype: str
    seq_len: int
    vocab_size: int
    splits: dict[str, list[Shard]]
    tokenizer: dict | None = field(default=None, compare=False)

    def num_sequences(self, split: str) -> int:
        return sum(s.num_sequences for s in self.shards(split))

    def shards(self, split: str) -> list[Shard]:
        if split not in self.splits:
            raise DataError(f"{self.uri}: no split {split!r} in {INDEX_NAME} (has: {', '.join(self.splits)})")
        return self.splits[split]

    def to_json(self) -> str:
        splits = {
            name: {
                "num_sequences": sum(s.num_sequences for s in shards),
                "shards": [s.__dict__ for s in shards],
            }
            for name, shards in self.splits.items()
        }
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": self.dtype,
            "seq_len": self.seq_len,
            "vocab_size": self.vocab_size,
            "splits": splits,
        }
        if self.tokenizer is not None:  # absent for byte tokens: their index is as it always was
            doc["tokenizer"] = self.tokenizer
        return json.dumps(doc, indent=1)


def join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


def read_index(uri: str, *, storage_options: dict | None = None) -> Index:
    path = join(uri, INDEX_NAME)
    try:
        with fsspec.open(path, "r", **(storage_options or {})) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise DataError(
            f"{path}: no dataset index here (create one with `orchestrator data prepare SRC... --out {uri}`)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: index is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DataError(f"{path}: not an {FORMAT} index (format={doc.get('format') if isinstance(doc, dict) else None!r})")
    if doc.get("version") != VERSION:
        raise DataError(f"{path}: index version {doc.get('version')!r}, this orchestrator reads version {VERSION}")
    try:
        dtype, vocab = doc["dtype"], int(doc["vocab_size"])
        splits = {
            name: [Shard(**s) for s in split["shards"]] for name, split in doc["splits"].items()
        }
        index = Index(uri, dtype, int(doc["seq_len"]), vocab, splits, tokenizer=doc.get("tokenizer"))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{path}: malformed index ({type(e).__name__}: {e})") from None
    if dtype not in DTYPES:
        raise DataError(f"{path}: token dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not 0 < vocab <= DTYPES[dtype]:
        raise DataError(f"{path}: vocab_size {vocab} does not fit dtype {dtype} (1..{DTYPES[dtype]})")
    return index
