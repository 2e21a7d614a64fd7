"""The static KV cache shared by the AR and the diffusion views.

``k`` and ``v`` are ``[layers, batch, max_len, kv_heads, head_dim]``; ``lengths[batch]``
says how many positions of each row are committed. Entries at or past a row's length are
stale: rolling back moves the length and never touches the data.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from orthrus_jax.config import ModelConfig
from orthrus_jax.sharding import Rules, named_sharding

CACHE_AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")
LENGTHS_AXES = ("batch",)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
    v: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
    lengths: jax.Array  # [batch] int32

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]


def init_cache(
    config: ModelConfig,
    batch_size: int,
    max_len: int,
    dtype=None,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
) -> KVCache:
    """An empty cache (all lengths 0), optionally placed on ``mesh`` by the logical rules."""
    shape = (config.num_hidden_layers, batch_size, max_len, config.num_key_value_heads,
             config.head_dim)
    dtype = config.jnp_dtype if dtype is None else dtype
    cache = KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                    jnp.zeros((batch_size,), jnp.int32))
    if mesh is not None:
        kv = named_sharding(CACHE_AXES, mesh, rules, shape, "kv_cache")
        ln = named_sharding(LENGTHS_AXES, mesh, rules, (batch_size,), "kv_cache.lengths")
        cache = KVCache(jax.device_put(cache.k, kv), jax.device_put(cache.v, kv),
                        jax.device_put(cache.lengths, ln))
    return cache


def write_block(cache_kv: jax.Array, layer: jax.Array, new: jax.Array,
                positions: jax.Array) -> jax.Array:
    """Write ``new[b, t]`` (``[batch, T, kv_heads, head_dim]``) at ``positions[b, t]`` of
    layer ``layer``; positions past ``max_len`` are dropped."""
    rows = jnp.arange(new.shape[0])[:, None]
    return cache_kv.at[layer, rows, positions].set(new.astype(cache_kv.dtype), mode="drop")
