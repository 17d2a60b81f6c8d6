"""Shamir secret sharing of byte strings over GF(256), byte-wise and vectorised.

Each secret byte s is the constant term of its own random polynomial of degree k-1; share x holds
p(x) for every byte. Any k shares determine p (Lagrange interpolation); any k-1 shares are uniformly
distributed whatever the secret (perfect secrecy). Coefficients come only from a CSPRNG: an AES-256
CTR keystream under a fresh key and nonce from `os.urandom` (the OS generator directly for tiny
secrets), never numpy's generator.

Speed: evaluation is Horner's rule and recombination a weighted XOR, both over whole byte strings,
so each step is one table-lookup pass (`gf256.mul_bytes`) plus one numpy XOR; Lagrange weights
depend only on the set of x-coordinates and are cached.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from facefed.common.gf256 import EXP, INV, LOG, MUL, MUL_ROWS

MAX_SHARES = 255
_URANDOM_BELOW = 64  # below this many random bytes, cipher set-up costs more than the syscall


@dataclass(frozen=True)
class Share:
    """One share: the x-coordinate (1..255) and p(x) for every byte of the secret."""

    x: int
    data: bytes


class _Keystream(threading.local):
    """Per-thread AES-256-CTR keystream keyed from os.urandom (a CTR-DRBG without the ceremony).

    Setting up a cipher costs about as much as generating 10 KB, so the stream is kept and
    re-keyed from the OS every `_REKEY_BYTES`, in every new thread, and in a forked child (which
    must never replay its parent's stream)."""

    encryptor: CipherContext | None = None
    generation = -1
    produced = 0


_REKEY_BYTES = 1 << 32
_ZEROS = bytes(1 << 20)
_stream = _Keystream()
_fork_generation = 0


def _after_fork() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork)


def random_bytes(n: int) -> bytes:
    """n bytes from a CSPRNG: the OS directly for tiny requests, else the per-thread AES-CTR stream."""
    if n < _URANDOM_BELOW:
        return os.urandom(n)
    st = _stream
    enc = st.encryptor
    if enc is None or st.generation != _fork_generation or st.produced > _REKEY_BYTES:
        enc = st.encryptor = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()
        st.generation, st.produced = _fork_generation, 0
    st.produced += n
    if n <= len(_ZEROS):
        return bytes(enc.update(memoryview(_ZEROS)[:n]))
    return bytes(enc.update(bytes(n)))


def check_parameters(n: int, k: int) -> None:
    """Raise ValueError naming the problem unless 1 <= k <= n <= 255."""
    for name, v in (("n", n), ("k", k)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{name} must be an integer, got {v!r}")
    if k < 1:
        raise ValueError(f"threshold k={k} must be at least 1")
    if n > MAX_SHARES:
        raise ValueError(f"n={n} shares: GF(256) has only {MAX_SHARES} non-zero x-coordinates; use n <= 255")
    if k > n:
        raise ValueError(f"threshold k={k} is larger than the number of shares n={n}; pick 1 <= k <= n")


def _check_xs(xs: Sequence[int]) -> tuple[int, ...]:
    xs = tuple(int(x) for x in xs)
    bad = [x for x in xs if not 1 <= x <= 255]
    if bad:
        raise ValueError(f"x-coordinates must be in 1..255, got {bad[0]}")
    if len(set(xs)) != len(xs):
        raise ValueError(f"x-coordinates must be distinct, got {list(xs)}")
    return xs


def split(secret: bytes, n: int, k: int, xs: Sequence[int] | None = None) -> list[Share]:
    """Split `secret` into n shares (at x = 1..n unless `xs` is given), any k of which recover it."""
    check_parameters(n, k)
    xs = _check_xs(xs if xs is not None else range(1, n + 1))
    if len(xs) != n:
        raise ValueError(f"{len(xs)} x-coordinates given for n={n} shares")
    secret = bytes(secret)
    size = len(secret)
    if k == 1:  # degree-0 polynomial: every share is the secret (no secrecy, but well defined)
        return [Share(x, secret) for x in xs]
    rand = bytearray(random_bytes((k - 1) * size))
    coeffs = [rand[i * size : (i + 1) * size] for i in range(k - 1)]  # c_1 .. c_{k-1}
    # p(x) = s + sum_j x^j c_j. Multiplying is linear in the constant, so once t*c is known for some
    # constants t, one that is the XOR of two known ones costs an XOR instead of a table pass: for
    # x = 1..5, 3c = 2c ^ c and 5c = 4c ^ c, which halves the lookups of a (3,5) split.
    steps, picks = _split_plan(xs, k)
    products: list[np.ndarray] = []
    for j, c in enumerate(coeffs):
        products.append(np.frombuffer(c, dtype=np.uint8))
        for op, a, b in steps[j]:
            if op:  # table pass: t*c_j
                products.append(np.frombuffer(c.translate(MUL_ROWS[a]), dtype=np.uint8))
            else:
                products.append(np.bitwise_xor(products[a], products[b]))
    base = np.frombuffer(secret, dtype=np.uint8)
    shares = []
    for x, pick in zip(xs, picks):
        y = np.bitwise_xor(base, products[pick[0]])
        for idx in pick[1:]:
            np.bitwise_xor(y, products[idx], out=y)
        shares.append(Share(x, y.tobytes()))
    return shares


@lru_cache(maxsize=1024)
def _split_plan(xs: tuple[int, ...], k: int) -> tuple[list[list[tuple[bool, int, int]]], list[list[int]]]:
    """For each coefficient c_j: steps producing the products t*c_j that the shares need, each either
    (True, t, 0): a table pass, or (False, a, b): XOR of products a and b. Plus, per share, the indices
    of the products it sums. Products are numbered across coefficients in creation order."""
    steps: list[list[tuple[bool, int, int]]] = []
    index_of: list[dict[int, int]] = []
    count = 0
    for j in range(1, k):
        needed = sorted({int(EXP[(int(LOG[x]) * j) % 255]) for x in xs})  # x^j
        known = {1: count}
        count += 1
        ops = []
        for t in needed:
            if t in known:
                continue
            a = next((a for a in known if (t ^ a) in known), None)
            ops.append((True, t, 0) if a is None else (False, known[a], known[t ^ a]))
            known[t] = count
            count += 1
        steps.append(ops)
        index_of.append(known)
    picks = [[index_of[j - 1][int(EXP[(int(LOG[x]) * j) % 255])] for j in range(1, k)] for x in xs]
    return steps, picks


@lru_cache(maxsize=4096)
def lagrange_weights(xs: tuple[int, ...], at: int = 0) -> tuple[int, ...]:
    """Weights w_i with p(at) = sum_i w_i * p(x_i) for every polynomial of degree < len(xs)."""
    xs = _check_xs(xs)
    if not 0 <= at <= 255:
        raise ValueError(f"evaluation point must be in 0..255, got {at}")
    weights = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = int(MUL[num, at ^ xj])  # (at - x_j); subtraction is XOR
                den = int(MUL[den, xi ^ xj])  # (x_i - x_j)
        weights.append(int(MUL[num, INV[den]]))
    return tuple(weights)


def _interpolate(shares: Sequence[Share], at: int) -> bytes:
    if not shares:
        raise ValueError("no shares given")
    size = len(shares[0].data)
    if any(len(s.data) != size for s in shares):
        raise ValueError(f"shares differ in length: {sorted({len(s.data) for s in shares})}")
    weights = lagrange_weights(tuple(s.x for s in shares), at)
    acc: bytearray | None = None
    view: npt.NDArray[np.uint8] | None = None
    for w, s in zip(weights, shares):
        if not w:
            continue
        data = s.data if isinstance(s.data, bytearray) else bytearray(s.data)  # the faster translate
        product = data.translate(MUL_ROWS[w])
        if acc is None or view is None:
            acc, view = product, np.frombuffer(product, dtype=np.uint8)
        else:
            np.bitwise_xor(view, np.frombuffer(product, dtype=np.uint8), out=view)
    return bytes(acc) if acc is not None else bytes(size)


def combine(shares: Sequence[Share]) -> bytes:
    """The secret from k shares (more work but the same result with more; fewer gives garbage)."""
    return _interpolate(shares, 0)


def regenerate(shares: Sequence[Share], x: int) -> Share:
    """The share at `x` from k others, without touching them: Lagrange evaluation at x."""
    if not 1 <= x <= 255:
        raise ValueError(f"x-coordinate must be in 1..255, got {x}")
    for s in shares:
        if s.x == x:
            return s
    return Share(x, _interpolate(shares, x))
