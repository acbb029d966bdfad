"""Philox4x32-10: Random123 known-answer vectors and the distribution helpers."""
import numpy as np
import pytest

from afire._C import rng

# Known-answer vectors published with Random123 (kat_vectors, philox4x32_10).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,expected", KAT)
def test_known_answers(ctr, key, expected):
    assert rng.philox4x32_10(ctr, key) == expected


def philox_numpy(ctr, key):
    """Independent re-implementation in Python integers."""
    c = list(ctr)
    k0, k1 = key
    for _ in range(10):
        p0 = 0xD2511F53 * c[0]
        p1 = 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & 0xFFFFFFFF, p1 & 0xFFFFFFFF,
             ((p0 >> 32) ^ c[3] ^ k1) & 0xFFFFFFFF, p0 & 0xFFFFFFFF]
        k0 = (k0 + 0x9E3779B9) & 0xFFFFFFFF
        k1 = (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return tuple(c)


def test_stream_layout_matches_block_function():
    seed, stream = 0x1234_5678_9ABC_DEF0, rng.stream(2, 17, 5)
    words = rng.u32(12, seed=seed, stream=stream)
    for block in range(3):
        ctr = (block, 0, stream & 0xFFFFFFFF, stream >> 32)
        key = (seed & 0xFFFFFFFF, seed >> 32)
        assert tuple(int(w) for w in words[4 * block: 4 * block + 4]) == philox_numpy(ctr, key)


def test_offset_gives_the_same_elements():
    full = rng.uniform(100, seed=3, stream=9)
    np.testing.assert_array_equal(rng.uniform(37, seed=3, stream=9, offset=50), full[50:87])


def test_uniform_moments_and_range():
    u = rng.uniform(200_000, seed=1)
    assert u.dtype == np.float32
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.005
    assert abs(u.var() - 1 / 12) < 0.002
    hist = np.histogram(u, bins=10, range=(0, 1))[0]
    assert hist.min() > 0.95 * 20_000


def test_normal_moments():
    z = rng.normal(200_000, seed=2).astype(np.float64)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs(np.mean(z ** 3)) < 0.03 and abs(np.mean(z ** 4) - 3) < 0.08
    assert np.isfinite(z).all()


def test_integers_inclusive_and_uniform():
    x = rng.integers(60_000, 16, 64, seed=4)
    assert x.min() == 16 and x.max() == 64
    counts = np.bincount(x - 16)
    assert counts.min() > 0.8 * 60_000 / 49
    assert set(rng.integers(1000, 3, 3, seed=5)) == {3}
    with pytest.raises(ValueError):
        rng.integers(5, 4, 3)


def test_streams_and_seeds_differ():
    a = rng.u32(64, seed=1, stream=1)
    assert not np.array_equal(a, rng.u32(64, seed=2, stream=1))
    assert not np.array_equal(a, rng.u32(64, seed=1, stream=2))
    np.testing.assert_array_equal(a, rng.u32(64, seed=1, stream=1))
    assert rng.stream(1, 2, 3) == (1 << 56) | (3 << 32) | 2
