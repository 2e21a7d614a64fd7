"""Array checksums: any one changed word changes them; they do not depend on where the
array lives (numpy, one device, sharded over a mesh); the reduction needs no temporaries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from orthrus_jax.checksum import _sums, array_checksum, first_mismatch, tree_checksums
from orthrus_jax.sharding import make_mesh


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.float16, np.int32, np.int8,
                                   np.bool_])
def test_every_single_element_change_changes_the_checksum(dtype):
    rng = np.random.default_rng(0)
    base = (rng.normal(size=(6, 10)) * 3).astype(dtype)
    reference = array_checksum(base)
    for index in np.ndindex(base.shape):
        changed = base.copy()
        if dtype == np.bool_:
            changed[index] = not changed[index]
        else:
            bits = changed.view(np.uint8 if changed.itemsize == 1 else
                                np.uint16 if changed.itemsize == 2 else np.uint32)
            bits[index] ^= 1  # the lowest bit of one element
        assert array_checksum(changed) != reference, (dtype, index)


def test_swapping_two_values_changes_the_checksum():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = a.copy()
    b[0, 1], b[2, 3] = a[2, 3], a[0, 1]
    assert array_checksum(a) != array_checksum(b)


def test_the_same_values_anywhere_give_the_same_checksum():
    a = np.random.default_rng(1).normal(size=(16, 24)).astype(np.float32)
    mesh = make_mesh("data=4,tensor=2")
    sharded = jax.device_put(a, NamedSharding(mesh, PartitionSpec("data", "tensor")))
    assert array_checksum(a) == array_checksum(jnp.asarray(a)) == array_checksum(sharded)
    tree = {"w": sharded, "step": jnp.int32(3)}
    assert tree_checksums(tree) == tree_checksums({"w": a, "step": np.int32(3)})
    assert first_mismatch(tree_checksums(tree), tree_checksums(tree)) is None
    other = tree_checksums({"w": a + 1, "step": np.int32(3)})
    assert first_mismatch(tree_checksums(tree), other) == "['w']"


def test_the_reduction_holds_no_copy_of_the_array():
    big = jax.ShapeDtypeStruct((4096, 2048), jnp.bfloat16)
    compiled = jax.jit(_sums).lower(big).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 2**20
