"""Byte-level damage for the file-reader fuzz tests: a Hypothesis strategy of mutations
(truncations, bit flips, overwrites with random or boundary values), half of them aimed
at the header, and the function that applies them."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st


def byte_mutations(size: int, header_end: int,
                   specials: Sequence[bytes]) -> st.SearchStrategy:
    """1 to 4 ``(kind, position, value)`` operations on a file of ``size`` bytes whose
    header ends at ``header_end``; overwrites use random bytes or one of ``specials``."""
    position = st.one_of(st.integers(0, header_end), st.integers(0, size - 1))
    truncate = st.tuples(st.just("truncate"), position, st.just(b""))
    flip = st.tuples(st.just("flip"), position, st.integers(1, 255).map(lambda b: bytes([b])))
    overwrite = st.tuples(st.just("overwrite"), position, st.one_of(
        st.binary(min_size=1, max_size=8), st.sampled_from(list(specials))))
    return st.lists(st.one_of(truncate, flip, overwrite), min_size=1, max_size=4)


def apply_mutations(data: bytes, ops) -> bytes:
    """``data`` after the operations of :func:`byte_mutations`, in order."""
    buf = bytearray(data)
    for kind, at, value in ops:
        at = min(at, len(buf))
        if kind == "truncate":
            del buf[at:]
        elif kind == "flip":
            if at < len(buf):
                buf[at] ^= value[0]
        else:
            buf[at:at + len(value)] = value[:max(0, len(buf) - at)]
    return bytes(buf)
