"""Turning documents into token ids for `data prepare`: raw bytes, or a Hugging Face tokenizer.

`tokenizers` is imported only when a tokenizer is asked for, so byte-token datasets need nothing
beyond numpy. Tokenizers are loaded from a local `tokenizer.json` only: nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.errors import DataError

# Tried in this order when --eos is not given: GPT-2/NeoX/Qwen, Llama 3, Llama 2/Mistral/T5, Gemma, BERT.
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
TRAINED_EOS = "<|endoftext|>"
PIECE_CHARS = 1 << 20  # text handed to the tokenizer at once


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise DataError("data prepare: --tokenizer/--train-tokenizer need the `tokenizers` package "
                        "(pip install tokenizers)") from None
    return tokenizers


def load_tokenizer(path: str):
    """A tokenizers.Tokenizer from a local tokenizer.json; one DataError line if it is missing or corrupt."""
    tk = _tokenizers()
    p = Path(path)
    if not p.is_file():
        hint = " (a directory: give the tokenizer.json inside it)" if p.is_dir() else ""
        raise DataError(f"{path}: tokenizer file not found{hint}")
    try:
        return tk.Tokenizer.from_file(str(p))
    except Exception as e:  # noqa: BLE001 (the Rust side raises plain Exception for any parse error)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: not a valid Hugging Face tokenizer.json ({first})") from None


def train_bpe(batches, vocab_size: int):
    """A byte-level BPE tokenizer trained on an iterator of lists of texts, with TRAINED_EOS as id 0."""
    tk = _tokenizers()
    if vocab_size < 257:
        raise DataError(f"data prepare: --train-tokenizer {vocab_size}: the vocabulary needs at least 257 entries "
                        f"(256 byte tokens + {TRAINED_EOS})")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[TRAINED_EOS], show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(batches, trainer)
    return tok


def vocab_size_of(tok) -> int:
    """Rows the model's embedding needs: the largest id + 1 (added tokens may leave gaps)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    return max(vocab.values()) + 1 if vocab else 0


def dtype_for(vocab_size: int) -> str:
    if vocab_size <= 1 << 8:
        return "uint8"
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def find_eos(tok, name: str | None) -> int | None:
    """Id of the document separator: `name` if given, else the first of EOS_CANDIDATES the tokenizer has."""
    if name is not None:
        eos = tok.token_to_id(name)
        if eos is None:
            raise DataError(f"data prepare: --eos {name!r} is not a token of this tokenizer")
        return eos
    for cand in EOS_CANDIDATES:
        eos = tok.token_to_id(cand)
        if eos is not None:
            return eos
    return None


class Encoder:
    """Documents -> one flat array of ids, each document followed by the separator.

    Without a tokenizer a token is a byte and the separator a newline (the byte-token format
    of before). With one, documents are encoded without the tokenizer's own special tokens
    (no BOS/CLS) and followed by the EOS id when there is one. A document longer than
    PIECE_CHARS is encoded in pieces cut at line ends, so a huge text file never becomes one
    list of Python ints (tokens can differ from a whole-file encoding only at those cuts).
    """

    def __init__(self, tok=None, *, eos: int | None = None):
        self.tok = tok
        self.eos = eos
        self.vocab_size = vocab_size_of(tok) if tok is not None else 256
        self.dtype = np.dtype(dtype_for(self.vocab_size))

    def encode(self, docs: list[str | bytes]) -> np.ndarray:
        if self.tok is None:
            return np.frombuffer(b"".join(_as_bytes(d) + b"\n" for d in docs), dtype=np.uint8)
        parts: list[np.ndarray] = []
        sep = np.array([] if self.eos is None else [self.eos], dtype=self.dtype)
        group: list[tuple[str, bool]] = []  # (piece, ends a document)
        size = 0
        for d in docs:
            text = d.decode("utf-8", errors="replace") if isinstance(d, bytes) else d
            cut = list(pieces(text))
            for i, piece in enumerate(cut):
                group.append((piece, i == len(cut) - 1))
                size += len(piece)
                if size >= PIECE_CHARS:
                    self._encode_group(group, sep, parts)
                    group, size = [], 0
        self._encode_group(group, sep, parts)
        return np.concatenate(parts) if parts else np.empty(0, dtype=self.dtype)

    def _encode_group(self, group: list[tuple[str, bool]], sep: np.ndarray, parts: list[np.ndarray]) -> None:
        encodings = self.tok.encode_batch([piece for piece, _ in group], add_special_tokens=False) if group else []
        for e, (_, last) in zip(encodings, group, strict=True):
            parts.append(np.asarray(e.ids, dtype=self.dtype))
            if last:
                parts.append(sep)


def pieces(text: str, limit: int | None = None):
    """`text` in pieces of at most `limit` characters, cut after a newline where there is one."""
    limit = limit or PIECE_CHARS
    start = 0
    while len(text) - start > limit:
        end = text.rfind("\n", start, start + limit) + 1 or start + limit
        yield text[start:end]
        start = end
    yield text[start:]


def _as_bytes(doc: str | bytes) -> bytes:
    return doc if isinstance(doc, bytes) else doc.encode("utf-8")
