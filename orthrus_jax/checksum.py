"""Checksums of arrays, computed where they live (one device or sharded over a mesh).

Orbax/TensorStore checkpoints carry no checksum of the array data: a flipped byte inside a
tensor's chunk is read back silently as a different value. A checksum stored beside a
checkpoint and compared after reading catches that. Each array's checksum is two 32-bit
sums over its bytes taken as unsigned words (16-bit dtypes as 16-bit words), each of a
different bijective mix of the word and its flat index, so any single changed word changes
both. Integer sums wrap and are exact in any order, so the result does not depend on the
sharding or the backend.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_WORDS = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _words(x: jax.Array) -> jax.Array:
    """``x``'s bytes as uint32 values (64-bit dtypes as two words per element)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = np.dtype(x.dtype).itemsize
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)  # adds a trailing axis of 2
    return jax.lax.bitcast_convert_type(x, _WORDS[size]).astype(jnp.uint32)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """Each element's row-major flat index (uint32, wrapping), without a reshape."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride = (stride * shape[axis]) % 2**32
    return index


def _sums(x: jax.Array) -> jax.Array:
    """``[2]`` uint32: the two sums, as one two-output reduction whose terms XLA computes
    in the loop that adds them (no temporary as large as ``x``)."""
    w = _words(x)
    i = _flat_index(w.shape)
    sums = jax.lax.reduce((_mix(w, i, 0x9E3779B1, 15), _mix(w, i, 0x85EBCA6B, 13)),
                          (jnp.uint32(0), jnp.uint32(0)),
                          lambda a, b: (a[0] + b[0], a[1] + b[1]), tuple(range(w.ndim)))
    return jnp.stack(sums)


def _mix(w: jax.Array, i: jax.Array, odd: int, shift: int) -> jax.Array:
    """xorshift((w + i * odd) * odd): for each index ``i`` a bijection of the word ``w``,
    so changing any one word changes the sum."""
    t = (w + i * jnp.uint32(odd)) * jnp.uint32(odd)
    return t ^ (t >> shift)


_tree_sums = jax.jit(lambda tree: jax.tree.map(_sums, tree))
_array_sums = jax.jit(_sums)


def _hex(sums) -> str:
    return f"{int(sums[0]):08x}{int(sums[1]):08x}"


def tree_checksums(tree: Any) -> dict[str, str]:
    """The checksum of every array leaf of ``tree``, by ``jax.tree_util.keystr`` path, as
    16 hex digits (one program for the whole tree). Leaves may be numpy or JAX arrays, on
    any sharding."""
    sums = jax.device_get(_tree_sums(tree))
    return {jax.tree_util.keystr(path): _hex(s)
            for path, s in jax.tree_util.tree_leaves_with_path(sums)}


def array_checksum(x: Any) -> str:
    """The checksum of one array as 16 hex digits (one program per shape and dtype)."""
    return _hex(jax.device_get(_array_sums(x)))


def first_mismatch(expected: dict[str, str], actual: dict[str, str]) -> str | None:
    """The first path whose checksum differs between the two, or that only one has."""
    for path in sorted(set(expected) | set(actual)):
        if expected.get(path) != actual.get(path):
            return path
    return None
