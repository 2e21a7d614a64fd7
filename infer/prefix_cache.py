"""Prefix caching: K/V of token prefixes kept on the device and reused by later requests.

A prompt is cut into blocks of ``block_tokens`` tokens. Block ``i``'s K/V depend on every
token up to its end, so a block is named by a hash chain: ``key_i = sha256(key_{i-1} ||
tokens of block i)`` (as vLLM's automatic prefix caching names its blocks). The
:class:`PrefixIndex` (host side) maps keys to slots of a device-resident store
(:class:`PrefixStore`: per layer, ``[num_blocks, kv_heads, block_tokens, head_dim]`` for K
and for V) and keeps them in least-recently-used order within a fixed number of blocks.

A key alone never decides a hit: each entry keeps its block's tokens and the entry of the
block before it, and a lookup follows the chain entry by entry, checking both. So a hash
collision, or a parent evicted and replaced since, ends the match instead of serving K/V
computed for other tokens.

A request's matched blocks are gathered into its fresh cache rows and only the rest of its
prompt is prefilled (``infer.slots.SlotEngine``); its prompt blocks are stored after the
prefill, and the blocks of prompt plus answer when its slot is freed, so a chat's next
turn finds its whole history.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from orthrus_jax.cache import KVCache, write_block
from orthrus_jax.config import ModelConfig

# The default tokens per block: small enough that a chat's history is mostly reused,
# large enough that a lookup walks few blocks.
DEFAULT_BLOCK_TOKENS = 64

Hasher = Callable[[bytes, Sequence[int]], bytes]


def chain_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The key of a block of ``tokens`` that follows the block keyed ``parent``."""
    return hashlib.sha256(parent + np.asarray(tokens, np.int64).tobytes()).digest()


@dataclasses.dataclass(eq=False)
class _Entry:
    key: bytes
    index: int  # slot in the device store
    tokens: tuple[int, ...]
    parent: _Entry | None  # the entry of the block before (None: the first block)
    live: bool = True


class PrefixIndex:
    """Which store slots hold which token blocks; see the module doc.

    ``num_blocks`` store slots of ``block_tokens`` tokens each. Counters (tokens):
    ``queries`` (prompt tokens looked up), ``hits`` (of those, served from the store);
    ``evicted`` counts blocks.
    """

    def __init__(self, num_blocks: int, block_tokens: int, hasher: Hasher = chain_hash):
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1")
        if block_tokens < 1:
            raise ValueError(f"block_tokens={block_tokens} must be >= 1")
        self.num_blocks, self.block_tokens, self._hash = num_blocks, block_tokens, hasher
        self._entries: collections.OrderedDict[bytes, _Entry] = collections.OrderedDict()
        self._free = list(range(num_blocks - 1, -1, -1))  # popped from the end: 0 first
        self.queries = self.hits = self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _blocks(self, ids: Sequence[int], n: int):
        """The first ``n`` full blocks of ``ids`` as ``(key, tokens)``, keys chained."""
        key, B = b"", self.block_tokens
        for i in range(n):
            tokens = tuple(int(t) for t in ids[i * B:(i + 1) * B])
            key = self._hash(key, tokens)
            yield key, tokens

    def _walk(self, ids: Sequence[int], n: int) -> list[_Entry]:
        """The entries of the longest stored chain among the first ``n`` blocks of ``ids``."""
        out: list[_Entry] = []
        for key, tokens in self._blocks(ids, n):
            e = self._entries.get(key)
            if e is None or e.tokens != tokens or e.parent is not (out[-1] if out else None):
                break
            out.append(e)
        return out

    def _touch(self, chain: list[_Entry]) -> None:
        # children first, so a block is always used more recently than its descendants:
        # eviction takes the tails of chains before their heads
        for e in reversed(chain):
            self._entries.move_to_end(e.key)

    def match(self, ids: Sequence[int], count: bool = True, own: int = 0) -> list[int]:
        """Store slots of the longest cached prefix of ``ids`` in whole blocks, leaving at
        least the last token to be computed (its logits pick the next token); counted in
        :attr:`queries` and :attr:`hits` (unless not ``count``; ``own``: tokens the
        request itself stored ahead of this lookup, its chunked prefill, are no hit), and
        marked recently used."""
        chain = self._walk(ids, (len(ids) - 1) // self.block_tokens)
        self._touch(chain)
        if count:
            self.queries += len(ids)
            self.hits += max(len(chain) * self.block_tokens - own, 0)
        return [e.index for e in chain]

    def insert(self, ids: Sequence[int]) -> list[tuple[int, int]]:
        """Make room for every full block of ``ids`` not stored yet (evicting the least
        recently used blocks when the store is full) and return ``(block, slot)`` pairs:
        block ``block`` of ``ids`` is to be written to store slot ``slot``. The blocks
        already stored are marked recently used."""
        n = len(ids) // self.block_tokens
        chain = self._walk(ids, n)
        self._touch(chain)
        todo, new = [], []
        parent = chain[-1] if chain else None
        for i, (key, tokens) in enumerate(self._blocks(ids, n)):
            if i < len(chain):
                continue
            old = self._entries.get(key)
            if old is not None:  # a collision or a dead chain: the new block replaces it
                self._drop(old)
            if not self._free:
                self._drop(next(iter(self._entries.values())))
                self.evicted += 1
            e = _Entry(key, self._free.pop(), tokens, parent)
            self._entries[key] = e
            todo.append((i, e.index))
            new.append(e)
            parent = e
        self._touch([e for e in chain + new if e.live])
        return todo

    def _drop(self, e: _Entry) -> None:
        del self._entries[e.key]
        e.live = False
        self._free.append(e.index)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PrefixStore:
    """The device side: ``k`` and ``v`` per layer ``[num_blocks, kv_heads, block_tokens,
    head_dim]`` (tuples of ``layers`` arrays, like a per-layer cache)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @property
    def num_blocks(self) -> int:
        return self.k[0].shape[0]

    @property
    def block_tokens(self) -> int:
        return self.k[0].shape[2]


def block_bytes(config: ModelConfig, block_tokens: int) -> int:
    """Bytes one stored block takes (K and V of every layer)."""
    return (2 * config.num_hidden_layers * config.num_key_value_heads * block_tokens
            * config.head_dim * np.dtype(config.jnp_dtype).itemsize)


def blocks_within(config: ModelConfig, mebibytes: float, block_tokens: int) -> int:
    """How many blocks of ``block_tokens`` tokens a store of ``mebibytes`` MiB holds."""
    return int(mebibytes * 2**20 // block_bytes(config, block_tokens))


def init_store(config: ModelConfig, num_blocks: int, block_tokens: int,
               sharding: jax.sharding.Sharding | None = None) -> PrefixStore:
    """A zero store of ``num_blocks`` blocks, placed with ``sharding`` (one layer's)."""
    shape = (num_blocks, config.num_key_value_heads, block_tokens, config.head_dim)

    def layers():
        arrays = tuple(jnp.zeros(shape, config.jnp_dtype)
                       for _ in range(config.num_hidden_layers))
        return arrays if sharding is None else tuple(jax.device_put(a, sharding)
                                                     for a in arrays)
    return PrefixStore(layers(), layers())


def gather_prefix(store: PrefixStore, blocks: jax.Array, lengths: jax.Array, max_len: int,
                  windows: tuple[int, ...] = ()) -> KVCache:
    """A per-layer cache of ``n`` rows whose row ``b`` holds store blocks ``blocks[b]``
    (``[n, max_len // block_tokens]`` slots, any valid slot past the row's own) at positions
    ``0, block_tokens, ...``, with length ``lengths[b]``: the positions past it are stale,
    as in any cache."""
    n, m = blocks.shape
    B = store.block_tokens
    if m * B != max_len:
        raise ValueError(f"{m} blocks of {B} tokens do not fill a cache of {max_len}")

    def rows(layer: jax.Array) -> jax.Array:  # [N, Hkv, B, hd] -> [n, Hkv, max_len, hd]
        g = layer[blocks]  # [n, m, Hkv, B, hd]
        return g.transpose(0, 2, 1, 3, 4).reshape(n, layer.shape[1], max_len, layer.shape[3])
    return KVCache(tuple(rows(a) for a in store.k), tuple(rows(a) for a in store.v),
                   lengths.astype(jnp.int32), windows)


def place_prefix(store: PrefixStore, cache: KVCache, blocks: jax.Array, lengths: jax.Array,
                 rows: jax.Array) -> KVCache:
    """``cache`` (of any batch, either form) with store blocks ``blocks[b, j]`` written
    into row ``rows[b]`` at positions ``j * block_tokens, ...`` for each ``j`` below
    ``ceil(lengths[b] / block_tokens)``; its lengths are left as they are. Only those
    blocks move (a loop over the longest row's blocks), the cache is updated in place.
    ``blocks [n, m]``, ``lengths [n]``, ``rows [n]``."""
    B = store.block_tokens
    S = cache.max_len
    counts = (lengths.astype(jnp.int32) + B - 1) // B

    def body(j: jax.Array, kv: tuple) -> tuple:
        at = blocks[:, j]  # [n] store slots
        # a row with fewer blocks writes past the cache: dropped
        positions = jnp.where((j < counts)[:, None], j * B + jnp.arange(B)[None, :], S)
        ks, vs = kv
        for layer, (sk, sv) in enumerate(zip(store.k, store.v, strict=True)):
            ks = write_block(ks, layer, sk[at].transpose(0, 2, 1, 3), positions, rows)
            vs = write_block(vs, layer, sv[at].transpose(0, 2, 1, 3), positions, rows)
        return ks, vs

    k, v = jax.lax.fori_loop(0, jnp.max(counts), body, (cache.k, cache.v))
    return dataclasses.replace(cache, k=k, v=v)


def store_row(store: PrefixStore, cache: KVCache, row: jax.Array, src: jax.Array,
              dst: jax.Array) -> PrefixStore:
    """Copy blocks ``src [m]`` (block numbers: positions ``src * block_tokens`` on) of row
    ``row`` of a per-layer ``cache`` into store slots ``dst [m]``; a ``dst`` of
    ``num_blocks`` or more is skipped (padding)."""
    B = store.block_tokens

    def put(slots: jax.Array, layer: jax.Array) -> jax.Array:
        one = layer[row]  # [Hkv, S, hd]
        H, S, hd = one.shape
        blocks = one.reshape(H, S // B, B, hd)[:, src].transpose(1, 0, 2, 3)  # [m, Hkv, B, hd]
        return slots.at[dst].set(blocks.astype(slots.dtype), mode="drop")
    return PrefixStore(tuple(put(s, c) for s, c in zip(store.k, cache.k, strict=True)),
                       tuple(put(s, c) for s, c in zip(store.v, cache.v, strict=True)))
