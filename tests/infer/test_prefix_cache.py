"""Prefix caching (:mod:`infer.prefix_cache`, ``SlotEngine(prefix_blocks=...)``).

The index: a lookup serves the longest stored chain of whole blocks, leaves the last token
to compute, evicts least recently used blocks (tails before heads) within its budget, and
never serves a block whose tokens differ (every hash colliding). The engine: requests that
share a system prompt, and a chat's second turn over its first, decode exactly as without
the cache and as offline, hit the store, compile nothing after warm-up, and the stored K/V
equal a fresh prefill's.
"""

from __future__ import annotations

import numpy as np
import pytest

import infer.slots
from infer.engine import Generator
from infer.prefix_cache import PrefixIndex, chain_hash
from infer.slots import SlotEngine, SlotParams
from orthrus_jax.cache import init_cache
from orthrus_jax.model import prefill
from tests.hf_reference import hf_model, to_orthrus

MAX_LEN = 64
B = 8  # tokens per block


# ---------------------------------------------------------------------------- index
def test_a_lookup_serves_whole_stored_blocks_and_leaves_the_last_token():
    idx = PrefixIndex(num_blocks=8, block_tokens=4)
    ids = list(range(10))
    assert idx.match(ids) == [] and (idx.queries, idx.hits) == (10, 0)
    todo = idx.insert(ids)  # two whole blocks; the last two tokens are no block
    assert [b for b, _ in todo] == [0, 1] and len({s for _, s in todo}) == 2
    assert idx.insert(ids) == []  # already stored
    assert idx.match(ids + [99]) == [s for _, s in todo] and idx.hits == 8
    # a prompt of exactly two blocks reuses one: its last token must be computed
    assert idx.match(ids[:8]) == [todo[0][1]]
    # another second block: the first is shared, the second not
    assert idx.match([0, 1, 2, 3, 7, 7, 7, 7, 7]) == [todo[0][1]]
    # same tokens at another place in the chain never match
    assert idx.match([4, 5, 6, 7, 0, 1, 2, 3, 9]) == []


def test_eviction_keeps_the_budget_and_takes_tails_before_heads():
    idx = PrefixIndex(num_blocks=3, block_tokens=2)
    a = [1, 1, 2, 2, 3, 3]
    idx.insert(a)
    assert len(idx) == 3 and idx.evicted == 0
    b = [9, 9, 8, 8]  # needs two slots: a's tail blocks go first
    todo = idx.insert(b)
    assert len(idx) == 3 and idx.evicted == 2
    assert sorted(s for _, s in todo) == sorted({0, 1, 2} - set(idx.match(a + [0])))
    assert len(idx.match(a + [0])) == 1  # a's head survived
    assert len(idx.match(b + [0])) == 2
    # a used most recently: c evicts b's tail
    idx.match(a + [0])
    idx.insert([5, 5, 4, 4])
    assert len(idx.match(a + [0])) == 1 and len(idx.match(b + [0])) == 0 or \
        len(idx.match(b + [0])) == 1


def test_a_colliding_hash_never_serves_other_tokens():
    idx = PrefixIndex(num_blocks=4, block_tokens=2, hasher=lambda parent, tokens: b"same")
    idx.insert([1, 2, 3, 4, 5])
    # every key collides: the entry at the key holds the last block written, [3, 4],
    # whose parent is dead; nothing else may match
    assert idx.match([1, 2, 3, 4, 5]) == []
    assert idx.match([3, 4, 5]) == []
    idx.insert([7, 8, 0])
    assert len(idx.match([7, 8, 0])) == 1
    assert idx.match([7, 9, 0]) == []  # same key, other tokens


def test_a_replaced_parent_ends_the_chain():
    keys = {}

    def hasher(parent, tokens):  # the first block of each prompt collides on purpose
        return b"head" if parent == b"" else keys.setdefault((parent, tuple(tokens)),
                                                             chain_hash(parent, tokens))
    idx = PrefixIndex(num_blocks=8, block_tokens=2, hasher=hasher)
    idx.insert([1, 2, 3, 4])
    idx.insert([5, 6, 3, 4])  # replaces the head [1, 2]; the same key names [5, 6]
    assert idx.match([1, 2, 3, 4, 0]) == []
    assert len(idx.match([5, 6, 3, 4, 0])) == 2


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="num_blocks=0"):
        PrefixIndex(0, 4)
    with pytest.raises(ValueError, match="block_tokens=0"):
        PrefixIndex(4, 0)


# ---------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def gen() -> Generator:
    return Generator(to_orthrus(hf_model("qwen3", False, seed=0), block_size=8), max_len=MAX_LEN)


def test_the_engine_refuses_a_block_that_does_not_divide_the_cache(gen):
    with pytest.raises(ValueError, match="prefix_block_tokens=24 must divide the cache"):
        SlotEngine(gen, slots=2, prefix_blocks=4, prefix_block_tokens=24)
    with pytest.raises(ValueError, match="prefix_blocks=-1"):
        SlotEngine(gen, slots=2, prefix_blocks=-1)


def _run(engine: SlotEngine, jobs):
    """Serve ``jobs`` (prompt, params) one after another in slot 0 (a chat's turns are
    built from earlier answers, so they cannot overlap), then a burst of the rest
    together. Returns the outputs in order."""
    outs = []
    for prompt, params in jobs:
        if callable(prompt):  # a next turn: built from the outputs so far
            prompt = prompt(outs)
        [u] = engine.insert_many([(0, prompt, params)])
        out = list(u.new_ids)
        while u.finish_reason is None:
            [u] = engine.step(1)
            out += u.new_ids
        engine.free(0)
        outs.append((prompt, out))
    return outs


@pytest.mark.parametrize("mode,tree_budget", [
    ("orthrus", None), pytest.param("ar", None, marks=pytest.mark.slow),
    pytest.param("orthrus", 5, marks=pytest.mark.slow)], ids=["orthrus", "ar", "orthrus-tree5"])
def test_shared_prefixes_and_chat_turns_decode_as_without_the_cache(gen, backend_compiles,
                                                                    mode, tree_budget):
    rng = np.random.default_rng(4)
    system = rng.integers(0, 512, 19).tolist()  # two whole blocks and a bit
    user = [rng.integers(0, 512, n).tolist() for n in (3, 5, 9)]
    jobs = [(system + user[0], SlotParams(6)),
            (system + user[1], SlotParams(5, temperature=0.8, seed=3)),
            # a second turn: first turn, its answer, a new message
            (lambda outs: outs[0][0] + outs[0][1] + user[2], SlotParams(6)),
            (system + user[2], SlotParams(4))]
    cached = SlotEngine(gen, slots=2, mode=mode, tree_budget=tree_budget, prefix_blocks=6,
                        prefix_block_tokens=B)
    cached.warm_up()
    n0 = backend_compiles()
    cached.exercise()  # the store stays empty: no block of its throwaway prompt
    assert len(cached.prefix) == 0 and cached.prefix.queries == 0
    assert not any(np.any(np.asarray(a)) for a in (*cached.store.k, *cached.store.v))
    got = _run(cached, jobs)
    assert backend_compiles() == n0  # lookups and stores change no shape
    plain = SlotEngine(gen, slots=2, mode=mode, tree_budget=tree_budget)
    assert got == _run(plain, jobs)
    # the second and fourth requests found the system prompt's two whole blocks; the
    # second turn found what the first turn stored when freed (prompt and answer but
    # its newest token)
    (p1, o1), _, (p3, _), _ = got
    turn = min((len(p1) + len(o1) - 1) // B, (len(p3) - 1) // B) * B
    assert turn >= 3 * B
    assert cached.prefix.hits == 2 * B + turn + 2 * B
    assert cached.prefix.queries == sum(len(p) for p, _ in got)
    for (prompt, out), (_, p) in zip(got, jobs, strict=True):  # and offline agrees
        [r] = gen.generate([prompt], mode=mode, max_new_tokens=p.max_new_tokens,
                           temperature=p.temperature, seed=p.seed, block_size=cached.block,
                           tree_budget=tree_budget)
        assert out == r.token_ids


def test_stored_blocks_hold_what_a_fresh_prefill_computes(gen):
    engine = SlotEngine(gen, slots=1, mode="ar", prefix_blocks=8, prefix_block_tokens=B)
    ids = np.random.default_rng(5).integers(0, 512, 50).tolist()
    engine.insert(0, ids, SlotParams(3))  # six blocks: two calls of the store program
    assert infer.slots.STORE_BLOCKS < 6
    slots = engine.prefix.match(ids + [0])
    assert len(slots) == 6
    cache = init_cache(gen.config, 1, MAX_LEN, per_layer=gen.model.per_layer)
    _, cache = prefill(gen.model, np.array([ids]), cache, np.array([len(ids)]))
    for layer in (0, gen.config.num_hidden_layers - 1):
        for store, fresh in ((engine.store.k, cache.k), (engine.store.v, cache.v)):
            for j, s in enumerate(slots):
                np.testing.assert_allclose(np.asarray(store[layer][s]),
                                           np.asarray(fresh[layer][0, :, j * B:(j + 1) * B]),
                                           atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["orthrus", pytest.param("ar", marks=pytest.mark.slow)])
def test_a_long_prompt_prefilled_in_chunks_between_steps_decodes_as_offline(gen, mode):
    engine = SlotEngine(gen, slots=2, mode=mode, prefix_blocks=8, prefix_block_tokens=B,
                        prefill_chunk=2 * B)
    engine.warm_up()
    rng = np.random.default_rng(6)
    short, long = rng.integers(0, 512, 5).tolist(), rng.integers(0, 512, 50).tolist()
    out = {0: engine.insert(0, short, SlotParams(12)).new_ids}
    assert not engine.needs_chunks(short) and engine.needs_chunks(long)
    steps = 0
    while engine.needs_chunks(long):  # 50 tokens: chunks of 16 until at most 16 are left
        engine.prefill_next_chunk(long)
        for u in engine.step(1):  # the running request goes on between chunks
            out[u.slot] += u.new_ids
        steps += 1
    assert engine.chunks == steps == 3 and engine.uncached(long) == 2
    out[1] = engine.insert(1, long, SlotParams(6)).new_ids
    assert engine.prefix.hits == 0  # its own chunks are no hit
    while any(engine.busy):
        for u in engine.step(1):
            out[u.slot] += u.new_ids
            if u.finish_reason:
                engine.free(u.slot)
    for slot, (prompt, n) in {0: (short, 12), 1: (long, 6)}.items():
        [r] = gen.generate([prompt], mode=mode, max_new_tokens=n, block_size=engine.block)
        assert out[slot] == r.token_ids, slot
    assert len(out[0]) > steps  # tokens came while the long prompt prefilled


def test_chunked_prefill_settings_are_checked(gen):
    for kwargs in (dict(prefill_chunk=16), dict(prefix_blocks=4, prefix_block_tokens=B,
                                               prefill_chunk=12)):
        with pytest.raises(ValueError, match="prefill_chunk=1[62] needs a prefix store"):
            SlotEngine(gen, slots=1, **kwargs)
    engine = SlotEngine(gen, slots=1, prefix_blocks=4, prefix_block_tokens=B, prefill_chunk=16)
    with pytest.raises(ValueError, match="needs no chunked prefill"):
        engine.prefill_next_chunk([1, 2, 3])
