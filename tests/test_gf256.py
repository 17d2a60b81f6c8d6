"""GF(2^8) arithmetic against an independent bitwise reference."""

from __future__ import annotations

import numpy as np
import pytest

from facefed.common import gf256


def reference_mul(a: int, b: int) -> int:
    """Carry-less (XOR) long multiplication, then reduction by x^8+x^4+x^3+x+1, bit by bit."""
    product = 0
    for bit in range(8):
        if b >> bit & 1:
            product ^= a << bit
    for bit in range(14, 7, -1):
        if product >> bit & 1:
            product ^= 0x11B << (bit - 8)
    return product


def test_multiplication_table_matches_bitwise_reference_for_all_65536_pairs():
    expected = np.array([[reference_mul(a, b) for b in range(256)] for a in range(256)], dtype=np.uint8)
    assert np.array_equal(gf256.MUL, expected)
    assert gf256.mul(0x57, 0x83) == 0xC1  # the worked example in FIPS-197, section 4.2


def test_inverse_and_division():
    for a in range(1, 256):
        assert gf256.mul(a, gf256.inv(a)) == 1
        assert gf256.div(gf256.mul(a, 0x1D), a) == 0x1D
    with pytest.raises(ZeroDivisionError):
        gf256.inv(0)


def test_generator_reaches_every_nonzero_element():
    assert sorted(int(v) for v in gf256.EXP[:255]) == list(range(1, 256))


def test_byte_string_multiplication_matches_scalar():
    data = bytes(range(256)) * 3
    for c in (0, 1, 2, 0x53, 0xFF):
        assert gf256.mul_bytes(c, data) == bytes(reference_mul(c, b) for b in data)


def test_rejects_out_of_field_values():
    with pytest.raises(ValueError, match="0..255"):
        gf256.mul(256, 1)
    with pytest.raises(ValueError):
        gf256.add(-1, 1)
