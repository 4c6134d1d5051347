"""A keyed pseudo-random permutation of [0, n) that never materialises n values.

A position x is split into two digits (x // b, x % b) of the mixed radix a x b, with a = ceil(sqrt n)
and b = ceil(n / a), so the domain a*b exceeds n by less than a. Each round adds a keyed hash of one
digit to the other, modulo its radix: a bijection, so the rounds compose to a permutation of
[0, a*b) (a Feistel network on unequal halves). The rare values that land in [n, a*b) are
encrypted again ("cycle walking") until they fall inside; the walk always ends because it follows
a cycle of a bijection that started inside [0, n). Everything is numpy over a batch of positions,
so memory is O(batch) and a few thousand positions cost a few dozen vectorised uint64 operations.

This is a shuffle, not cryptography: the round function is a multiply-xorshift hash, reduced to
the digit's radix by multiply-shift rather than division.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

ROUNDS = 6
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S1 = np.uint64(29)
_S32 = np.uint64(32)


def round_keys(*parts: int | str) -> np.ndarray:
    """ROUNDS 64-bit keys derived from the parts (seed, epoch, ...), stable across platforms."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    digest += hashlib.sha256(digest).digest()
    return np.frombuffer(digest[: 8 * ROUNDS], dtype="<u8").astype(np.uint64)


def _hash(x: np.ndarray, key: np.uint64, radix: np.uint64) -> np.ndarray:
    """A keyed hash of each x, uniform in [0, radix): the top 32 bits scaled by multiply-shift
    (no division, which is slow for small radices)."""
    h = x ^ key
    h *= _M1
    h ^= h >> _S1
    h *= _M2
    h >>= _S32
    h *= radix  # < 2**32 * 2**31: no overflow
    h >>= _S32
    return h


def _add_mod(digit: np.ndarray, h: np.ndarray, radix: np.uint64) -> None:
    """digit = (digit + h) mod radix, in place, for digit and h in [0, radix)."""
    digit += h
    np.minimum(digit, digit - radix, out=digit)  # below radix, digit - radix wraps to a huge value


def _sub_mod(digit: np.ndarray, h: np.ndarray, radix: np.uint64) -> None:
    """digit = (digit - h) mod radix, in place, for digit and h in [0, radix)."""
    digit += radix
    digit -= h
    np.minimum(digit, digit - radix, out=digit)


class Permutation:
    """`perm(positions)` -> the values at those positions of a fixed permutation of [0, n)."""

    def __init__(self, n: int, keys: np.ndarray):
        if n < 1:
            raise ValueError(f"permutation domain must be at least 1, got {n}")
        if n > 2**62:
            raise ValueError(f"permutation domain {n} is too large (max 2**62)")
        self.n = n
        a = max(2, math.isqrt(n - 1) + 1)
        b = max(2, -(-n // a))
        self.a, self.b = np.uint64(a), np.uint64(b)
        self.keys = [np.uint64(k) for k in keys]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        hi, lo = np.divmod(x, self.b)
        for i, k in enumerate(self.keys):
            if i % 2 == 0:
                _add_mod(hi, _hash(lo, k, self.a), self.a)
            else:
                _add_mod(lo, _hash(hi, k, self.b), self.b)
        hi *= self.b
        hi += lo
        return hi

    def _decrypt(self, y: np.ndarray) -> np.ndarray:
        hi, lo = np.divmod(y, self.b)
        for i in reversed(range(len(self.keys))):
            k = self.keys[i]
            if i % 2 == 0:
                _sub_mod(hi, _hash(lo, k, self.a), self.a)
            else:
                _sub_mod(lo, _hash(hi, k, self.b), self.b)
        hi *= self.b
        hi += lo
        return hi

    def _walk(self, x: np.ndarray, step) -> np.ndarray:
        n = np.uint64(self.n)
        y = step(x)
        out = y >= n
        while out.any():  # rare (< 1/b of values); ends, see the module docstring
            y[out] = step(y[out])
            out = y >= n
        return y

    def _check(self, x: np.ndarray, what: str) -> None:
        # out-of-domain inputs would never walk back into range
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"{what} out of range [0, {self.n}): min {x.min()}, max {x.max()}")

    def __call__(self, positions) -> np.ndarray:
        """Values (int64) at `positions` (array-like of ints in [0, n))."""
        x = np.asarray(positions, dtype=np.int64)
        self._check(x, "positions")
        if self.n == 1:
            return np.zeros_like(x)
        return self._walk(x.view(np.uint64), self._encrypt).view(np.int64)  # in range, so views are exact

    def inverse(self, values) -> np.ndarray:
        """Positions (int64) of `values`: inverse(perm(p)) == p."""
        x = np.asarray(values, dtype=np.int64)
        self._check(x, "values")
        if self.n == 1:
            return np.zeros_like(x)
        return self._walk(x.view(np.uint64), self._decrypt).view(np.int64)
