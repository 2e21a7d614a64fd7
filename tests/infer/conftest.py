"""Fixtures shared by the decoding tests."""

import sys

import pytest


@pytest.fixture(autouse=True, scope="module")
def _drop_cached_generators():
    """The generators that ``tests.infer.test_decode`` caches (and their compiled programs)
    live for one module: several modules build theirs through it, and kept to the end of
    the suite they would hold every program they compiled."""
    yield
    decode_tests = sys.modules.get("tests.infer.test_decode")
    if decode_tests is not None:
        decode_tests._GENS.clear()
        decode_tests._HF.clear()
