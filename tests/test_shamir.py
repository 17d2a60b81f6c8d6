"""Shamir sharing over GF(256) on real LFW JPEG bytes: round trips, thresholds, secrecy, regeneration."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import chisquare
from vault_support import load_faces

from facefed.common.shamir import Share, combine, lagrange_weights, regenerate, split


@pytest.fixture(scope="module")
def jpegs(lfw) -> list[bytes]:
    faces = load_faces(lfw, 12)
    return [data for imgs in faces.values() for _, data in imgs][:8]


@pytest.mark.parametrize("k,n", [(2, 3), (3, 5)])
def test_any_k_of_n_shares_rebuild_real_jpeg_bytes(jpegs, k, n):
    for secret in jpegs:
        shares = split(secret, n, k)
        assert [s.x for s in shares] == list(range(1, n + 1))
        assert all(len(s.data) == len(secret) for s in shares)
        for subset in itertools.combinations(shares, k):
            assert combine(subset) == secret
            assert combine(subset[::-1]) == secret  # order does not matter
        assert combine(shares) == secret  # more than k also works
        for subset in itertools.combinations(shares, k - 1):
            if k > 1:
                assert combine(subset) != secret  # k-1 interpolate a different polynomial


def test_splitting_is_randomised(jpegs):
    a, b = split(jpegs[0], 3, 2), split(jpegs[0], 3, 2)
    assert a[0].data != b[0].data


def test_k1_and_n255_and_empty_secret():
    assert all(s.data == b"face" for s in split(b"face", 4, 1))
    shares = split(b"\x00\x01\xfe\xff" * 10, 255, 2)
    assert combine([shares[0], shares[254]]) == b"\x00\x01\xfe\xff" * 10
    assert combine(split(b"", 3, 2)[:2]) == b""


def test_regenerated_share_is_identical_to_the_lost_one(jpegs):
    shares = split(jpegs[1], 5, 3)
    for lost in shares:
        others = [s for s in shares if s.x != lost.x]
        for subset in itertools.combinations(others, 3):
            assert regenerate(subset, lost.x) == lost


def test_k_minus_1_shares_of_a_constant_secret_are_uniform():
    """Perfect secrecy: any k-1 shares are jointly uniform, whatever the secret. Chi-square on the
    joint byte pairs of two shares of a (3,5) sharing, for two different constant secrets. The same
    test on k shares of a (2,5) sharing (which determine the secret) must reject uniformity."""
    size = 1 << 21
    for secret_byte in (0x00, 0xA7):
        shares = split(bytes([secret_byte]) * size, 5, 3)
        for a, b in ((shares[1], shares[4]), (shares[0], shares[2])):
            pairs = np.frombuffer(a.data, np.uint8).astype(np.int64) << 8 | np.frombuffer(b.data, np.uint8)
            counts = np.bincount(pairs, minlength=65536)
            assert chisquare(counts).pvalue > 1e-6  # 8 checks: a false alarm about once in 10^5 runs
            singles = np.bincount(np.frombuffer(a.data, np.uint8), minlength=256)
            assert chisquare(singles).pvalue > 1e-6
    # Negative control: the statistic has power. k shares of a constant are far from uniform.
    shares = split(bytes(size), 5, 2)
    pairs = np.frombuffer(shares[0].data, np.uint8).astype(np.int64) << 8 | np.frombuffer(shares[3].data, np.uint8)
    assert chisquare(np.bincount(pairs, minlength=65536)).pvalue < 1e-12


def test_lagrange_weights_reproduce_known_values():
    # Interpolating at one of the points gives the unit vector.
    assert lagrange_weights((1, 2, 3), 2) == (0, 1, 0)
    # Weights at 0 for any x-set sum (XOR) to 1: the constant polynomial 1 must come back as 1.
    for xs in [(1, 2), (3, 7, 200), tuple(range(1, 11))]:
        acc = 0
        for w in lagrange_weights(xs, 0):
            acc ^= w
        assert acc == 1


@pytest.mark.parametrize("n,k,msg", [(3, 4, "larger than"), (3, 0, "at least 1"), (256, 2, "n <= 255")])
def test_bad_parameters_name_the_problem(n, k, msg):
    with pytest.raises(ValueError, match=msg):
        split(b"x", n, k)


def test_bad_share_sets_are_refused():
    with pytest.raises(ValueError, match="distinct"):
        combine([Share(1, b"ab"), Share(1, b"cd")])
    with pytest.raises(ValueError, match="length"):
        combine([Share(1, b"ab"), Share(2, b"c")])
    with pytest.raises(ValueError, match="1..255"):
        combine([Share(0, b"ab"), Share(2, b"cd")])
