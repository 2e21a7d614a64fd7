"""The static KV cache shared by the AR and the diffusion views.

Each layer's ``k`` and ``v`` are ``[batch, kv_heads, max_len, head_dim]``: a KV head's
positions are contiguous, so ``[batch * kv_heads, max_len, head_dim]`` is the same buffer
and feeds the attention products as it is (no transposed copy per layer and pass). The
cache holds them in one of two forms, like the layer weights (``model.unstack_layers``):

- stacked, ``[layers, batch, kv_heads, max_len, head_dim]`` (``init_cache``'s default):
  indexed by a traced layer inside ``lax.scan`` (training, the stacked model);
- per layer, a tuple of ``layers`` arrays (``init_cache(..., per_layer=True)``), the
  decoding form: each unrolled layer writes its own array in place, so no pass copies a
  layer out of a stack or the stack around an update.

``lengths[batch]`` says how many positions of each row are committed. Entries at or past a
row's length are stale: rolling back moves the length and never touches the data.

``windows`` (static) are the shorter lengths a pass over the cache may restrict its
attention to (:func:`attention_windows`): each pass reads the smallest window that holds
every row's live positions, so its attention costs what the live lengths need rather
than ``max_len`` (:func:`orthrus_jax.attention.over_window`). Empty: every pass reads the
whole cache.

``lengths`` may cover fewer rows than ``k``/``v`` hold: a pass over such a cache computes,
writes and reads the first ``len(lengths)`` rows only, in place (how a server steps its
busy slots without copying their K/V).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from orthrus_jax.config import ModelConfig
from orthrus_jax.sharding import Rules, named_sharding

CACHE_AXES = ("layers", "batch", "kv_heads", "cache_seq", "head_dim")
LAYER_CACHE_AXES = CACHE_AXES[1:]
LENGTHS_AXES = ("batch",)

KV = jax.Array | tuple[jax.Array, ...]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: KV  # [layers, batch, kv_heads, max_len, head_dim], or layers x [batch, kv_heads, ...]
    v: KV  # like k
    lengths: jax.Array  # [batch] int32
    # ascending static lengths < max_len that attention may read instead of the whole cache
    windows: tuple[int, ...] = dataclasses.field(default=(), metadata={"static": True})

    @property
    def per_layer(self) -> bool:
        """Whether K/V are tuples of per-layer arrays (the decoding form)."""
        return isinstance(self.k, tuple)

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]  # layer 0 of either form

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def batch_axis(self) -> int:
        """The batch axis of each array of ``k`` and ``v``."""
        return 0 if self.per_layer else 1


def init_cache(
    config: ModelConfig,
    batch_size: int,
    max_len: int,
    dtype=None,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    per_layer: bool = False,
    windows: tuple[int, ...] = (),
) -> KVCache:
    """An empty cache (all lengths 0), stacked or ``per_layer`` (see the module doc),
    optionally placed on ``mesh`` by the logical rules, whose passes read the smallest of
    ``windows`` that holds the live positions (see the module doc; e.g.
    :func:`attention_windows` of ``max_len``)."""
    windows = _check_windows(windows, max_len)
    L = config.num_hidden_layers
    shape = (L, batch_size, config.num_key_value_heads, max_len, config.head_dim)
    dtype = config.jnp_dtype if dtype is None else dtype
    lengths = jnp.zeros((batch_size,), jnp.int32)
    if mesh is not None:
        kv = named_sharding(CACHE_AXES, mesh, rules, shape, "kv_cache")
        ln = named_sharding(LENGTHS_AXES, mesh, rules, (batch_size,), "kv_cache.lengths")
        lengths = jax.device_put(lengths, ln)
    if not per_layer:
        k, v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
        if mesh is not None:
            k, v = jax.device_put(k, kv), jax.device_put(v, kv)
        return KVCache(k, v, lengths, windows)

    def layers() -> tuple[jax.Array, ...]:
        arrays = tuple(jnp.zeros(shape[1:], dtype) for _ in range(L))
        if mesh is None:
            return arrays
        one = NamedSharding(kv.mesh, PartitionSpec(*kv.spec[1:]))
        return tuple(jax.device_put(a, one) for a in arrays)

    return KVCache(layers(), layers(), lengths, windows)


# Cache lengths per octave of :func:`cache_bucket`, and the least length it gives: below
# it a cache's K/V are small next to the weights and attention reads them whole anyway
# (``MIN_WINDOW``), and one length for every short request means one program for them.
CACHE_STEPS = 8
MIN_CACHE_LEN = 256


def length_bucket(n: int, steps: int, minimum: int = 1) -> int:
    """The smallest ``m * 2^e >= max(n, minimum)`` with ``steps <= m < 2 * steps``:
    ``steps`` lengths per octave (``steps`` a power of two), so at most ``1 / (steps +
    1)`` of the length past ``minimum`` goes unused."""
    n = max(int(n), int(minimum), 1)
    e = max(n.bit_length() - steps.bit_length(), 0)
    return -(-n // (1 << e)) << e  # m = ceil(n / 2^e) lies in [steps, 2 steps]


def cache_bucket(n: int, minimum: int = MIN_CACHE_LEN) -> int:
    """The cache length that holds ``n`` positions: :func:`length_bucket` with
    ``CACHE_STEPS`` (eight lengths per octave: 256, 288, 320, .., 480, 512, 576, ..), at
    least ``minimum``. Past ``minimum`` at most ``1 / 9`` (11 %) of the positions it gives
    are unused, against up to half for a power of two, while the lengths a cache can have
    stay few (a compiled program per length)."""
    return length_bucket(n, CACHE_STEPS, minimum)


# Padded prompt lengths per octave (16, 24, 32, 48, 64, 96, ...): a prefill program each.
PROMPT_STEPS = 2
# The shortest padded prompt.
MIN_PROMPT_BUCKET = 16


def prompt_len_bucket(n: int) -> int:
    """The padded length of an ``n``-token prompt: :func:`length_bucket` with
    ``PROMPT_STEPS``, at least ``MIN_PROMPT_BUCKET`` (16, 24, 32, 48, 64, 96, ...; at
    most a third of it padding)."""
    return length_bucket(n, PROMPT_STEPS, MIN_PROMPT_BUCKET)


# The shortest window worth a branch: below it the whole-cache read costs less than a branch.
MIN_WINDOW = 256


def attention_windows(max_len: int, smallest: int = MIN_WINDOW) -> tuple[int, ...]:
    """The static attention lengths of a ``max_len`` cache: the powers of two times
    ``smallest`` that are below ``max_len`` (none for ``max_len <= smallest``). A pass then
    reads at most twice the positions it needs (or ``smallest``, or the whole cache), and
    a compiled pass holds about ``log2(max_len / smallest)`` attention branches per
    layer."""
    out, w = [], smallest
    while w < max_len:
        out.append(w)
        w *= 2
    return tuple(out)


def _check_windows(windows, max_len: int) -> tuple[int, ...]:
    windows = tuple(int(w) for w in windows)
    if any(not 0 < w < max_len for w in windows) or list(windows) != sorted(set(windows)):
        raise ValueError(f"windows={windows}: must be ascending distinct lengths in "
                         f"(0, max_len={max_len})")
    return windows


def stack_cache(cache: KVCache) -> KVCache:
    """``cache`` in the stacked form (itself if already stacked)."""
    if not cache.per_layer:
        return cache
    return dataclasses.replace(cache, k=jnp.stack(cache.k), v=jnp.stack(cache.v))


def unstack_cache(cache: KVCache) -> KVCache:
    """``cache`` in the per-layer form (itself if already per layer)."""
    if cache.per_layer:
        return cache
    split = lambda a: tuple(a[i] for i in range(a.shape[0]))  # noqa: E731
    return dataclasses.replace(cache, k=split(cache.k), v=split(cache.v))


def layer_kv(cache_kv: KV, layer) -> jax.Array:
    """Layer ``layer`` (an int, or traced for a stacked cache) of ``cache.k`` or
    ``cache.v``: ``[batch, kv_heads, max_len, head_dim]``."""
    if isinstance(cache_kv, tuple):
        return cache_kv[layer]
    return jax.lax.dynamic_index_in_dim(cache_kv, layer, keepdims=False)


def write_block(cache_kv: KV, layer, new: jax.Array, positions: jax.Array,
                rows: jax.Array | None = None) -> KV:
    """Write ``new[b, t]`` (``[R, T, kv_heads, head_dim]``) at ``positions[b, t]`` of
    layer ``layer`` of ``cache_kv`` (either form; returned in the same form), into cache
    row ``rows[b]`` (``[R]`` int32; default: the first ``R`` rows); positions past
    ``max_len`` are dropped. In the per-layer form only that layer's array is updated."""
    if rows is None:
        rows = jnp.arange(new.shape[0], dtype=jnp.int32)
    if isinstance(cache_kv, tuple):
        one = _write_layer(cache_kv[layer], new, positions, rows)
        return cache_kv[:layer] + (one,) + cache_kv[layer + 1:]
    # [l, b, :, s] with the advanced indices apart: the update is [B, T, kv_heads, hd].
    return cache_kv.at[layer, rows[:, None], :, positions].set(new.astype(cache_kv.dtype),
                                                               mode="drop")


def _write_layer(one: jax.Array, new: jax.Array, positions: jax.Array,
                 rows: jax.Array) -> jax.Array:
    """:func:`write_block` into one layer's array ``[B, Hkv, S, hd]``.

    The write goes through the ``[B * Hkv, S, hd]`` view the attention products read (one
    scatter row per head and token): written in that shape, the products read the updated
    buffer in place. (Written as ``[B, Hkv, S, hd]``, XLA turns a one-token write into a
    dynamic-update-slice whose reshaped result it recomputes for the products, copying
    the whole layer several times per pass.)
    """
    B, H, S, hd = one.shape
    R, T = positions.shape
    heads = rows[:, None, None] * H + jnp.arange(H)[None, None, :]  # [R, 1, H]
    flat = one.reshape(B * H, S, hd).at[
        jnp.broadcast_to(heads, (R, T, H)), jnp.broadcast_to(positions[:, :, None], (R, T, H))
    ].set(new.astype(one.dtype), mode="drop")
    return flat.reshape(B, H, S, hd)


def write_rows(cache: KVCache, new_k: jax.Array, new_v: jax.Array, rows: jax.Array) -> KVCache:
    """Write, for every layer ``l``, ``new_k[l, b, rows[b, d]]`` (and ``new_v``) at cache
    position ``cache.lengths[b] + d``, ``d < P``; lengths unchanged.

    ``new_k``, ``new_v`` ``[layers, B, T, kv_heads, head_dim]``: the K/V of a pass that
    wrote nothing (a tree's verify pass); ``rows [B, P]``: which of its ``T`` rows go to
    the ``P`` positions after each row's length (the accepted path). Positions past
    ``max_len`` are dropped. Only ``P`` entries per row and layer move; the cache is
    updated in place.
    """
    at = rows[None, :, :, None, None]
    k = jnp.take_along_axis(new_k, at, axis=2)  # [L, B, P, Hkv, hd]
    v = jnp.take_along_axis(new_v, at, axis=2)
    positions = cache.lengths[:, None] + jnp.arange(rows.shape[1], dtype=jnp.int32)[None, :]
    ck, cv = cache.k, cache.v
    for layer in range(k.shape[0]):
        ck = write_block(ck, layer, k[layer], positions)
        cv = write_block(cv, layer, v[layer], positions)
    return dataclasses.replace(cache, k=ck, v=cv)
