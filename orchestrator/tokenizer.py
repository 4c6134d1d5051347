"""Byte-level tokenizer: a token is a byte, so every text round-trips and the vocabulary is 256."""

from __future__ import annotations

VOCAB_SIZE = 256


def encode(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8")


def decode(tokens) -> str:
    """Tokens (bytes, or ints in 0..255) back to text; invalid UTF-8 becomes U+FFFD."""
    return bytes(bytearray(int(t) for t in tokens)).decode("utf-8", errors="replace")
