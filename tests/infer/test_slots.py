"""Continuous batching (:class:`infer.slots.SlotEngine`) on a tiny random model (CPU).

Requests of mixed prompt and output lengths, greedy and sampled, arrive while others
decode, some are freed early: each equals ``Generator.generate`` of its prompt alone (an
early-freed one: a prefix of it), and nothing compiles after the warm-up.
"""

from __future__ import annotations

import numpy as np
import pytest

import infer.slots
from infer.block_size import BlockPlan
from infer.buckets import prompt_buckets
from infer.engine import Generator
from infer.slots import SlotEngine, SlotParams, row_counts
from orthrus_jax.cache import attention_windows
from orthrus_jax.sharding import make_mesh, shard_model
from tests.hf_reference import hf_model, to_orthrus

MAX_LEN = 64
EOS_PROMPT = [1, 2, 3]


@pytest.fixture(scope="module")
def gen() -> Generator:
    return Generator(to_orthrus(hf_model("qwen3", False, seed=0), block_size=8), max_len=MAX_LEN)


@pytest.fixture(scope="module")
def eos(gen) -> list[int]:
    """An EOS id that the greedy answer to ``EOS_PROMPT`` reaches at its 4th token."""
    return [gen.generate([EOS_PROMPT], max_new_tokens=8, eos_ids=[])[0].token_ids[3]]


def _requests(seed: int, n: int, max_new: tuple[int, int]) -> list[tuple[list[int], SlotParams]]:
    """Prompts of 1 .. 40 tokens and budgets in ``max_new``: offline, a few shape buckets
    only (each compiles)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(1, 41))
        sampled = i % 2 == 1
        params = SlotParams(int(rng.integers(max_new[0], max_new[1] + 1)),
                            temperature=0.9 if sampled else 0.0,
                            top_k=5 if i % 3 == 0 and sampled else 0,
                            top_p=0.8 if i % 5 == 1 else 1.0, seed=int(rng.integers(0, 1000)))
        out.append((rng.integers(0, 512, length).tolist(), params))
    out[0] = (EOS_PROMPT, SlotParams(8))  # stops at EOS
    return out


def _serve(engine: SlotEngine, reqs, cancel_after: dict[int, int], at_once: bool = False):
    """Admit requests into the lowest free slot, at most one per iteration (``at_once``:
    into every free slot, prefilled together by ``insert_many``); request
    ``i`` in ``cancel_after`` is freed after that many iterations. Returns outputs and
    finish reasons (None: freed early)."""
    out: dict[int, list[int]] = {i: [] for i in range(len(reqs))}
    finish: dict[int, str | None] = {}
    owner: dict[int, int] = {}
    age: dict[int, int] = {}
    pending = list(range(len(reqs)))

    def take(u):
        i = owner[u.slot]
        out[i] += u.new_ids
        if u.finish_reason or age[i] >= cancel_after.get(i, 1 << 30):
            finish[i] = u.finish_reason
            engine.free(u.slot)
            del owner[u.slot]

    while pending or owner:
        # one arrival per iteration: the busy slots grow from slot 0 and drain unevenly
        free = engine.free_slots()
        if pending and free and at_once:
            admitted = list(zip(free, pending, strict=False))
            del pending[:len(admitted)]
            for s, i in admitted:
                owner[s], age[i] = i, 0
            for u in engine.insert_many([(s, *reqs[i]) for s, i in admitted]):
                take(u)
        elif pending and free:
            i = pending.pop(0)
            owner[free[0]], age[i] = i, 0
            take(engine.insert(free[0], *reqs[i]))
        for u in engine.step(1):
            age[owner[u.slot]] += 1
            take(u)
    return out, finish


@pytest.mark.slow
@pytest.mark.parametrize("mode,tree_budget,at_once", [
    ("orthrus", None, False), ("ar", None, False), ("orthrus", 5, False), ("orthrus", None, True)],
    ids=["orthrus", "ar", "orthrus-tree5", "orthrus-batched-prefill"])
def test_slots_equal_offline_and_never_recompile(gen, eos, backend_compiles, mode, tree_budget,
                                                at_once, monkeypatch):
    # The slots' cache reads windows of 16 and 32 positions (offline reads its whole cache).
    monkeypatch.setattr(infer.slots, "attention_windows",
                        lambda n: attention_windows(n, smallest=16))
    engine = SlotEngine(gen, slots=4, mode=mode, eos_ids=eos, tree_budget=tree_budget,
                        prefill_rows=4 if at_once else 1)
    assert engine.state.cache.windows == (16, 32)
    assert engine.row_counts == (1, 2, 4)
    assert engine.tree_budget == (tree_budget or 0)
    assert engine.buckets == prompt_buckets(MAX_LEN, gen.chunk_size) == [16, 24, 32, 48, 64]
    engine.warm_up()
    n0 = backend_compiles()
    # every program run once on a throwaway prompt: what it
    # leaves in the slots changes no answer below, and it counts as no traffic
    assert engine.exercise() > 0 and not engine.warm_runs()
    assert engine.free_slots() == [0, 1, 2, 3]
    assert not engine.inserted and not engine.rows_stepped
    # one output bucket offline: max_new + block <= 16
    reqs = _requests(seed=1 if mode == "orthrus" else 2, n=12,
                     max_new=(2, 8) if mode == "orthrus" else (8, 15))
    cancel = {3: 1, 8: 0}
    out, finish = _serve(engine, reqs, cancel, at_once)
    assert backend_compiles() == n0  # no shape depends on the traffic
    assert engine.free_slots() == [0, 1, 2, 3]
    if at_once:
        assert max(engine.inserted) > 1  # prompts were prefilled together
    else:
        assert len(engine.rows_stepped) > 1  # steps of fewer rows than slots ran
    reasons = set()
    for i, (prompt, p) in enumerate(reqs):
        [r] = gen.generate([prompt], mode=mode, max_new_tokens=p.max_new_tokens,
                           temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                           seed=p.seed, eos_ids=eos, block_size=engine.block,
                           tree_budget=tree_budget)
        if i in cancel and finish[i] is None:
            assert out[i] == r.token_ids[:len(out[i])] and out[i], i
        else:
            assert (out[i], finish[i]) == (r.token_ids, r.finish_reason), i
            reasons.add(r.finish_reason)
    assert reasons == {"eos", "length"}
    assert finish[8] is None  # freed right after its prefill


@pytest.mark.slow
def test_speculation_by_load_switches_plans_between_steps_and_stays_lossless(
        gen, eos, backend_compiles, monkeypatch):
    """Each row count steps with its own plan (a chain alone, AR steps at two rows, trees
    at four): greedy rows equal offline AR decoding token for token whatever plans their
    steps ran, sampled rows finish within their budgets, and nothing compiles after the
    warm-up."""
    monkeypatch.setattr(infer.slots, "attention_windows",
                        lambda n: attention_windows(n, smallest=16))
    plans = {1: (4, 0), 2: (1, 0), 4: (3, 2)}
    engine = SlotEngine(gen, slots=4, eos_ids=eos, plans=plans)
    assert engine.plans == plans
    assert engine.describe_plans() == ("1 row: block size 4; 2 rows: plain AR steps; "
                                       "4 rows: block size 3, trees of 2 nodes")
    engine.warm_up()
    reqs = _requests(seed=4, n=12, max_new=(4, 12))
    n0 = backend_compiles()
    seen = set()
    real_step = engine.step

    def step(n):
        out = real_step(n)
        seen.add((engine.rows, engine.block, engine.tree_budget))
        return out
    engine.step = step
    out, finish = _serve(engine, reqs, {})
    assert backend_compiles() == n0
    assert {rows for rows, _, _ in seen} == {1, 2, 4}  # every plan ran
    assert seen == {(rows, *plans[rows]) for rows, _, _ in seen}
    for i, (prompt, p) in enumerate(reqs):
        if p.temperature == 0:
            [r] = gen.generate([prompt], mode="ar", max_new_tokens=p.max_new_tokens,
                               eos_ids=eos)
            assert (out[i], finish[i]) == (r.token_ids, r.finish_reason), i
        else:
            assert 1 <= len(out[i]) <= p.max_new_tokens and finish[i] in ("eos", "length")


def test_plans_are_chosen_per_row_count_from_costs_at_the_smallest_window(gen, monkeypatch):
    """``"auto"`` asks for the plan of each row count at that batch size, with costs over
    the cache's smallest attention window; fixed settings hold at every row count."""
    asked = []

    def block_plan(block_size, *, tree_budget, greedy, batch_size, max_len, adaptive):
        asked.append((block_size, tree_budget, greedy, batch_size, max_len, adaptive))
        return BlockPlan((1,), 1) if batch_size > 2 else BlockPlan((5,), 5, tree_budget=3)
    monkeypatch.setattr(gen, "block_plan", block_plan)
    monkeypatch.setattr(infer.slots, "attention_windows",
                        lambda n: attention_windows(n, smallest=16))
    engine = SlotEngine(gen, slots=4, block_size="auto", tree_budget="auto")
    assert engine.plans == {1: (5, 3), 2: (5, 3), 4: (1, 0)}
    assert asked == [("auto", "auto", False, rows, 16, False) for rows in (1, 2, 4)]
    assert (engine.block, engine.tree_budget) == (5, 3)  # the plan of one row, before a step
    monkeypatch.undo()
    fixed = SlotEngine(gen, slots=4, block_size=3, tree_budget=2)
    assert fixed.plans == {1: (3, 2), 2: (3, 2), 4: (3, 2)}
    assert fixed.describe_plans() == "block size 3, trees of 2 nodes"
    assert SlotEngine(gen, slots=2, mode="ar").plans == {1: (1, 0), 2: (1, 0)}


@pytest.mark.parametrize("plans,match", [
    ({1: (4, 0), 2: (4, 0)}, r"each row count \[1, 2, 4\]"),
    ({1: (4, 0), 2: (9, 0), 4: (1, 0)}, r"plans\[2\]: block 9 is not in \[1, 8\]"),
    ({1: (1, 3), 2: (4, 0), 4: (1, 0)}, r"plans\[1\]: tree budget 3 needs a block"),
    ({1: (4, 256), 2: (4, 0), 4: (1, 0)}, r"plans\[1\]: tree budget 256"),
])
def test_bad_plans_are_refused_naming_the_row_count(gen, plans, match):
    with pytest.raises(ValueError, match=match):
        SlotEngine(gen, slots=4, plans=plans)


def test_row_counts_are_powers_of_two_up_to_the_slots():
    assert row_counts(1) == (1,)
    assert row_counts(8) == (1, 2, 4, 8)
    assert row_counts(6) == (1, 2, 4, 6)


def test_a_lone_request_steps_one_row_wherever_the_others_were(gen):
    engine = SlotEngine(gen, slots=4, mode="ar")
    assert engine.rows_for([0]) == 1
    assert engine.rows_for([0, 1]) == 2
    assert engine.rows_for([2]) == 4
    assert engine.rows_for([1, 3]) == 4


def test_insert_many_checks_every_request_before_inserting_any(gen):
    assert SlotEngine(gen, slots=4, mode="ar").insert_counts(16) == (1,)  # the default
    with pytest.raises(ValueError, match="prefill_rows=0"):
        SlotEngine(gen, slots=4, mode="ar", prefill_rows=0)
    engine = SlotEngine(gen, slots=4, mode="ar", prefill_rows=4)
    assert engine.insert_counts(16) == (1, 2, 4) and engine.insert_counts(32) == (1, 2)
    assert engine.insert_counts(64) == (1,)
    good = ([1, 2, 3], SlotParams(4))
    for bad, match in [((1, [1] * MAX_LEN, SlotParams(1)), "does not fit"),
                       ((1, [1], SlotParams(0)), "max_new_tokens=0"),
                       ((0, [1], SlotParams(1)), "given twice"),
                       ((7, [1], SlotParams(1)), "slot 7 is not in")]:
        with pytest.raises(ValueError, match=match):
            engine.insert_many([(0, *good), bad])
        assert engine.free_slots() == [0, 1, 2, 3] and not engine.inserted
    [u0, u2] = engine.insert_many([(0, *good), (2, [5, 6], SlotParams(3))])
    assert (u0.slot, u2.slot) == (0, 2) and len(u0.new_ids) == len(u2.new_ids) == 1
    assert engine.inserted == {2: 1} and engine.free_slots() == [1, 3]
    with pytest.raises(ValueError, match="slot 2 is busy"):
        engine.insert_many([(1, *good), (2, *good)])
    assert engine.free_slots() == [1, 3]


def test_each_slot_has_one_record_of_what_it_holds(gen):
    """A slot is free, kept for a request (its long prompt prefilling in chunks) or
    decoding one; the record names the request's owner, and only that owner's insert
    takes a kept slot."""
    engine = SlotEngine(gen, slots=4, mode="ar")
    a, b = object(), object()
    engine.keep(1, a)
    assert engine.free_slots() == [0, 2, 3] and engine.busy == [False] * 4
    with pytest.raises(ValueError, match="slot 1 is not a free slot"):
        engine.keep(1, b)
    with pytest.raises(ValueError, match="slot 1 is kept for another request"):
        engine.insert_many([(1, [1, 2], SlotParams(3))], [b])
    engine.insert_many([(1, [1, 2], SlotParams(3)), (2, [3], SlotParams(3))], [a, b])
    assert engine.owners() == {1: a, 2: b} and engine.busy == [False, True, True, False]
    assert engine.records[1].held[:2] == [1, 2] and engine.records[1].shown == 1
    with pytest.raises(ValueError, match="slot 2 decodes a request"):
        engine.release(2)
    engine.free(1)
    assert engine.owners() == {2: b} and engine.free_slots() == [0, 1, 3]
    engine.keep(3, a)
    engine.release(3)
    assert engine.free_slots() == [0, 1, 3]
    with pytest.raises(ValueError, match="owners: one handle"):
        engine.insert_many([(0, [1], SlotParams(1))], [None])


def test_insert_refuses_bad_input(gen):
    engine = SlotEngine(gen, slots=1)
    with pytest.raises(ValueError, match="does not fit the context of 64"):
        engine.insert(0, [1] * MAX_LEN, SlotParams(1))
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        engine.insert(0, [1], SlotParams(0))
    with pytest.raises(ValueError, match="top_p"):
        engine.insert(0, [1], SlotParams(1, temperature=1.0, top_p=0.0))
    assert engine.free_slots() == [0]
    with pytest.raises(ValueError, match="mode"):
        SlotEngine(gen, slots=1, mode="beam")


@pytest.mark.slow
def test_slots_on_a_tensor_mesh_equal_offline(gen):
    """KV heads split over ``tensor``: the programs keep the state's layout (each is
    compiled for it), batched inserts, steps of fewer rows and the prefix store (split
    like the cache) included."""
    mesh = make_mesh("tensor=2")
    model = shard_model(to_orthrus(hf_model("qwen3", False, seed=0), block_size=8), mesh)
    engine = SlotEngine(Generator(model, max_len=MAX_LEN, mesh=mesh), slots=4, prefill_rows=2,
                        prefix_blocks=4, prefix_block_tokens=8)
    engine.warm_up()
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 512, n).tolist() for n in (3, 9, 14)]
    budgets = (6, 6, 2)  # slot 2 finishes first: the last steps run 2 rows
    out = {u.slot: u.new_ids for u in engine.insert_many(
        [(i, p, SlotParams(n)) for i, (p, n) in enumerate(zip(prompts, budgets, strict=True))])}
    while any(engine.busy):
        for u in engine.step(1):
            out[u.slot] += u.new_ids
            if u.finish_reason:
                engine.free(u.slot)
    want = [gen.generate([p], max_new_tokens=n, block_size=engine.block)[0].token_ids
            for p, n in zip(prompts, budgets, strict=True)]
    assert [out[i] for i in range(3)] == want
    assert engine.inserted[2] == 1 and len(engine.rows_stepped) > 1
    # the longest prompt again: its first block comes from the store
    [u] = engine.insert_many([(3, prompts[2], SlotParams(2))])
    again = u.new_ids + engine.step(1)[0].new_ids
    assert again == want[2] and engine.prefix.hits == 8
