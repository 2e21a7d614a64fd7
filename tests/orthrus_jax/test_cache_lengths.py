"""Cache lengths (:func:`orthrus_jax.cache.cache_bucket`): eight per octave past the least
one, so at most 11 % of a cache is past what its rows can fill."""

from __future__ import annotations

import numpy as np
import pytest

from orthrus_jax.cache import CACHE_STEPS, MIN_CACHE_LEN, cache_bucket


def test_a_cache_holds_what_it_is_asked_for_with_at_most_a_ninth_unused():
    n = np.arange(1, 300_000)
    got = np.array([cache_bucket(int(x)) for x in n])
    assert (got >= n).all() and (got >= MIN_CACHE_LEN).all()
    past = n >= MIN_CACHE_LEN
    unused = 1 - n[past] / got[past]
    assert unused.max() <= 1 / 9 + 1e-12, unused.max()
    assert (np.diff(got) >= 0).all()  # a longer request never gets a shorter cache
    assert set(got[n < MIN_CACHE_LEN]) == {MIN_CACHE_LEN}


@pytest.mark.parametrize("octave", [256, 512, 4096, 32768])
def test_eight_lengths_per_octave(octave):
    lengths = sorted({cache_bucket(n) for n in range(octave + 1, 2 * octave + 1)})
    assert len(lengths) == CACHE_STEPS and lengths[-1] == 2 * octave
    assert lengths == [octave * (CACHE_STEPS + i + 1) // CACHE_STEPS for i in range(CACHE_STEPS)]


def test_the_ladder_examples():
    assert [cache_bucket(n) for n in (1, 256, 257, 647, 4499, 40_000)] == [
        256, 256, 288, 704, 4608, 40_960]
    assert cache_bucket(17, minimum=16) == 18 and cache_bucket(5, minimum=1) == 5
