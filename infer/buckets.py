"""Shape choices of the decode programs, in one place: the buckets a batch's shapes are
rounded to, the cache length they decode over, and :class:`DecodeSpec`, the static
description of one compiled program (and its compile key).

Every length a program sees is bucketed, so prompts of different lengths inside one
bucket reuse one compiled program: batch rows and output room are powers of two, prompts
a power of two or three quarters of one, at least 16 tokens
(:func:`orthrus_jax.cache.prompt_len_bucket`; or whole prefill chunks past the chunk
size), end-of-sequence id lists a power of two of at least 8.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from orthrus_jax.cache import cache_bucket, prompt_len_bucket

MODES = ("orthrus", "ar")
# Default rows per batch: the prompts rounded up to 2^n, at most this many (each row holds
# a whole KV cache: 1000 rows of an 8B model would need ~77 GB).
DEFAULT_MAX_BATCH = 8
# Largest draft-tree budget (drafted nodes) a program may take: its verify pass has
# budget + 1 rows.
MAX_TREE_BUDGET = 255
# ``max_steps`` of a decode loop that runs until every row is done.
NO_LIMIT = int(np.iinfo(np.int32).max)


def bucket(n: int, minimum: int = 1) -> int:
    """Next power of two >= max(n, minimum)."""
    return 1 << (max(n, minimum) - 1).bit_length()


def prompt_bucket(longest: int, chunk_size: int) -> int:
    """The padded prompt length of a batch whose longest prompt has ``longest`` tokens: a
    power of two or three quarters of one (:func:`orthrus_jax.cache.prompt_len_bucket`:
    16, 24, 32, 48, 64, 96, ...), or whole prefill chunks of ``chunk_size`` tokens past
    that size. At most a third of the padded length is padding (an 87-token chat prompt
    prefills 96 positions, not 128), against up to half for powers of two."""
    prompt_len = prompt_len_bucket(longest)
    if prompt_len > chunk_size:
        prompt_len = -(-longest // chunk_size) * chunk_size
    return prompt_len


def prompt_buckets(max_len: int, chunk_size: int) -> list[int]:
    """Every padded prompt length a prompt of 1 .. ``max_len - 1`` tokens can get."""
    return sorted({prompt_bucket(n, chunk_size) for n in range(1, max_len)})


def cache_len(longest: int, max_new_tokens: int, max_len: int) -> int:
    """Cache positions for a batch whose longest prompt has ``longest`` tokens, each row
    generating up to ``max_new_tokens``: the positions a row can fill, ``longest +
    max_new_tokens - 1`` (its newest token is not cached), rounded up by
    :func:`orthrus_jax.cache.cache_bucket` (at most 11 % of the cache unused), at most
    ``max_len``.

    It is not the padded prompt length plus the output room: those are powers of two
    (or whole prefill chunks), and their sum can leave half the cache unused (a 520-token
    prompt with 128 new tokens would get 1,024 + 128 positions for the 647 it fills; it
    gets 704). Padding positions past the cache are dropped by the prefill's writes, and
    no room is kept for a verify block either: K/V written past the end are dropped and
    never committed (:func:`infer.decode.commit`).
    """
    return min(cache_bucket(longest + max_new_tokens - 1), max_len)


def max_block(mode: str, trained_block: int) -> int:
    """The most tokens one iteration may commit: the head's trained block (whatever size
    decodes) in Orthrus mode, 1 in AR mode. It sizes the histograms and the controller's
    statistics."""
    return trained_block if mode == "orthrus" else 1


def default_batch_size(n_prompts: int) -> int:
    """Rows per batch when none is given: ``n_prompts`` rounded up to a power of two, at
    most :data:`DEFAULT_MAX_BATCH`."""
    return min(bucket(n_prompts), DEFAULT_MAX_BATCH)


def eos_array(config_eos: Sequence[int], eos_ids: Sequence[int] | None) -> jax.Array:
    """``int32 [E]``: ``eos_ids`` (default: the model's, ``config_eos``), padded with -1 to
    a power of two of at least 8 (a bucket: a different number of ids compiles nothing
    new)."""
    eos = [int(t) for t in (config_eos if eos_ids is None else eos_ids)]
    return jnp.asarray(eos + [-1] * (bucket(len(eos), 8) - len(eos)), jnp.int32)


def check_prompt_ids(ids: Sequence[int], vocab_size: int, max_len: int) -> None:
    """Raise ``ValueError`` naming the problem unless ``ids`` is a non-empty list of token
    ids of the vocabulary that leaves at least one of ``max_len`` cache positions free."""
    if isinstance(ids, str):
        raise ValueError("prompt is text: encode it first (Generator.encode), or use "
                         "infer.engine.generate(model_dir, texts)")
    if len(ids) == 0:
        raise ValueError("empty prompt: give at least one token")
    bad = [t for t in ids if not 0 <= int(t) < vocab_size]
    if bad:
        raise ValueError(f"token id(s) {bad[:5]} outside the vocabulary [0, {vocab_size})")
    if len(ids) >= max_len:
        raise ValueError(f"prompt of {len(ids)} tokens does not fit the context of "
                         f"{max_len} tokens (at least one position must stay free)")


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """The static choices of one compiled pair of decode programs (prefill-and-first-token,
    and the loop): hashable, it is the engine's compile key.

    ``blocks``: the block sizes the loop runs (``(1,)``: plain AR steps; ``(K,)``: Orthrus
    drafting ``K - 1`` tokens per iteration; several: a per-iteration choice among them,
    see :mod:`infer.decode`). ``greedy``: the program has no sampling code at all (a
    sampling program still decodes its temperature-0 rows greedily). ``max_block``: the
    size of the per-row histograms and statistics (:func:`max_block`). ``tree_budget``:
    0 verifies each drafting iteration's drafts as a chain; ``N > 0`` verifies a tree of
    ``N`` drafted nodes of depth at most ``K - 1`` instead (:mod:`infer.tree`).
    """

    mode: str
    blocks: tuple[int, ...]
    greedy: bool
    batch: int
    prompt_len: int
    out_len: int
    max_len: int  # cache positions per row (:func:`cache_len`)
    n_eos: int
    max_block: int
    prefill_chunk: int | None = None  # prefill in chunks of this many tokens
    tree_budget: int = 0  # drafted nodes per tree (0: a chain)
    prefill_progress: bool = False  # report each prefilled chunk to the host

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}: choose one of {MODES}")
        if not self.blocks or any(not 1 <= k <= self.max_block for k in self.blocks):
            raise ValueError(f"blocks={self.blocks}: each size must be in [1, "
                             f"{self.max_block}]")
        if not 0 <= self.tree_budget <= MAX_TREE_BUDGET:
            raise ValueError(f"tree_budget={self.tree_budget}: must be in [0, "
                             f"{MAX_TREE_BUDGET}] (0 = chain)")
        if self.tree_budget and self.blocks == (1,):
            raise ValueError("tree_budget applies to drafting programs, not plain AR steps")

    @property
    def adaptive(self) -> bool:
        """Whether the loop chooses among several block sizes per iteration."""
        return len(self.blocks) > 1

    def describe(self) -> dict:
        """The spec as a JSON-ready mapping (for reports)."""
        return dataclasses.asdict(self) | {"blocks": list(self.blocks)}
