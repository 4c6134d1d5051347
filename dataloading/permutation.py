"""A keyed pseudo-random permutation of [0, n) that never materialises n values.

A position x is split into two digits (x // b, x % b) of the mixed radix a x b, with a = ceil(sqrt n)
and b = ceil(n / a), so the domain a*b exceeds n by less than a. Each round adds a keyed hash of one
digit to the other, modulo its radix: a bijection, so the rounds compose to a permutation of
[0, a*b) (a Feistel network on unequal halves). The rare values that land in [n, a*b) are
encrypted again ("cycle walking") until they fall inside; the walk always ends because it follows
a cycle of a bijection that started inside [0, n). Only the lanes still outside are walked again.
Everything is numpy over a batch of positions, so memory is O(batch) plus the tables below.

This is a shuffle, not cryptography: the round function is a multiply-xorshift hash, reduced to
the digit's radix by multiply-shift rather than division.

Speed: a round's hash depends on one digit only, which takes a < 2**17 or b < 2**17 values when
n < ~1.7e10. From the second call on, such a permutation evaluates each round's hash once for
every digit value into a table (the same numbers, so the same order) and then costs three or four
numpy calls per round (gather, add, then a gather from a "mod radix" table for radices up to 2**14
or a wrap-around minimum above) instead of eleven. The tables hold at most 5 (a + b) int64 values:
~0.8 MB at n = 10**8, 4.8 MB at n = 10**10, at most 6.3 MB; building them is one hashing pass
(a few ms at n = 10**10), skipped for one-off calls such as the first batch after a resume.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

ROUNDS = 6
TABLE_MAX_RADIX = 1 << 17  # per-round hash tables when both radices are at most this
MOD_TABLE_MAX_RADIX = 1 << 14  # and "mod radix" tables too when both are at most this
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
    """A keyed hash of each x (uint64), uniform in [0, radix): the top 32 bits scaled by
    multiply-shift (no division, which is slow for small radices)."""
    h = x ^ key
    h *= _M1
    t = h >> _S1
    h ^= t
    h *= _M2
    h >>= _S32
    h *= radix  # < 2**32 * 2**31: no overflow
    h >>= _S32
    return h


def _add_mod(digit: np.ndarray, h: np.ndarray, radix: np.uint64) -> None:
    """digit = (digit + h) mod radix, in place, for uint64 digit and h in [0, radix)."""
    digit += h
    np.minimum(digit, digit - radix, out=digit)  # below radix, digit - radix wraps to a huge value


def _sub_mod(digit: np.ndarray, h: np.ndarray, radix: np.uint64) -> None:
    """digit = (digit - h) mod radix, in place, for uint64 digit and h in [0, radix)."""
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
        self._ia, self._ib = a, b
        self.keys = [np.uint64(k) for k in keys]
        self._tables: list[tuple[np.ndarray, np.ndarray]] | None = None
        self._calls = 0

    # --- the Feistel network -----------------------------------------------------------------

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        """One pass of the network over uint64 x (not modified); the hash form."""
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

    def _build_tables(self) -> None:
        """Each round's hash of every value of the digit it reads: exactly the numbers
        `_encrypt` computes. For small radices also x -> x mod radix over [0, 2 radix) for the
        digit a round updates (a gather beats arithmetic while the tables stay in cache); for
        large ones the hash table holds hash - radix and the sum is wrapped arithmetically."""
        a, b = self._ia, self._ib
        small = max(a, b) <= MOD_TABLE_MAX_RADIX
        mods = []
        for r in (a, b):
            mod = np.arange(2 * r, dtype=np.int64)
            mod[r:] -= r
            mods.append(mod if small else None)
        digits = np.arange(b, dtype=np.uint64), np.arange(a, dtype=np.uint64)
        radices = (self.a, self.b)
        tables = []
        for i, k in enumerate(self.keys):  # even rounds: hi += hash(lo) mod a; odd: lo += hash(hi) mod b
            table = _hash(digits[i % 2], k, radices[i % 2]).view(np.int64)
            if not small:
                table -= (a, b)[i % 2]
            tables.append((table, mods[i % 2]))
        self._tables = tables

    def _encrypt_tables(self, x: np.ndarray) -> np.ndarray:
        """`_encrypt` by table lookups, over int64 x in [0, a*b) (not modified)."""
        b = self._ib
        hi = x // b
        lo = hi * b
        np.subtract(x, lo, out=lo)
        radices = (self.a, self.b)
        for i, (table, mod) in enumerate(self._tables):
            read, write = (lo, hi) if i % 2 == 0 else (hi, lo)
            s = table.take(read)
            s += write
            if mod is not None:
                s = mod.take(s)
            else:  # s = digit + hash - radix in [-radix, radix): add radix back where negative
                u = s.view(np.uint64)
                np.minimum(u, u + radices[i % 2], out=u)  # negative s: u + radix wraps to s + radix
            if i % 2 == 0:
                hi = s
            else:
                lo = s
        hi *= b
        hi += lo
        return hi

    def _forward(self, x: np.ndarray, *, tables: bool | None = None) -> np.ndarray:
        """Values (int64) at int64 positions x, known to lie in [0, n). `tables` forces a form
        (tests compare them); by default tables are used, and built, from the second call on."""
        if self.n == 1:
            return np.zeros_like(x)
        if tables is None:
            self._calls += 1
            tables = self._tables is not None or (
                self._calls > 1 and max(self._ia, self._ib) <= TABLE_MAX_RADIX)
        if tables:
            if self._tables is None:
                self._build_tables()
            step = self._encrypt_tables
        else:
            def step(v: np.ndarray) -> np.ndarray:
                return self._encrypt(v.view(np.uint64)).view(np.int64)  # < 2**63: views are exact
        return self._walk(step(x), step)

    def _walk(self, y: np.ndarray, step) -> np.ndarray:
        """Cycle walking: step again only the lanes that are still outside [0, n)."""
        n = self.n
        if y.size == 0 or y.max() < n:
            return y
        lanes = np.flatnonzero(y >= n)
        while lanes.size:  # rare (< 1/b of values); ends, see the module docstring
            z = step(y[lanes])
            y[lanes] = z
            lanes = lanes[z >= n]
        return y

    # --- public ------------------------------------------------------------------------------

    def _check(self, x: np.ndarray, what: str) -> None:
        # out-of-domain inputs would never walk back into range
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"{what} out of range [0, {self.n}): min {x.min()}, max {x.max()}")

    def __call__(self, positions) -> np.ndarray:
        """Values (int64) at `positions` (array-like of ints in [0, n))."""
        x = np.asarray(positions, dtype=np.int64)
        self._check(x, "positions")
        return self._forward(x)

    def span(self, start: int, count: int) -> np.ndarray:
        """Values (int64) at positions start, start + 1, ..., start + count - 1: `self(arange)`
        with the range checked on two integers instead of the array."""
        if start < 0 or count < 0 or start + count > self.n:
            raise IndexError(f"positions [{start}, {start + count}) out of range [0, {self.n})")
        return self._forward(np.arange(start, start + count, dtype=np.int64))

    def inverse(self, values) -> np.ndarray:
        """Positions (int64) of `values`: inverse(perm(p)) == p."""
        x = np.asarray(values, dtype=np.int64)
        self._check(x, "values")
        if self.n == 1:
            return np.zeros_like(x)

        def step(v: np.ndarray) -> np.ndarray:
            return self._decrypt(v.view(np.uint64)).view(np.int64)
        return self._walk(step(x), step)
