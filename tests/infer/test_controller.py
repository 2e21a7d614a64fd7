"""The block-size controller of the decode loop (``infer.decode.choose_block`` and the
statistics ``record`` keeps), driven directly with synthetic acceptance sequences, and
the loop's step limit:

- the choice is a deterministic function of its inputs, and follows the expected tokens
  per second of each size (per-row counts pulled towards the prior);
- a row that drafts poorly falls back to AR steps, and a row whose text becomes
  predictable again returns to drafting within a bounded number of steps (probes every
  ``PROBE_AFTER`` AR steps);
- rows of a batch keep their own statistics; the batch runs the size with the most
  expected tokens per second over its active rows;
- ``run`` with the no-limit step count continues a state whose step is already past 0;
- the loop that chooses among sizes updates the cache in place, as a one-size loop does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from infer.buckets import NO_LIMIT
from infer.decode import (
    PROBE_AFTER,
    DecodeInputs,
    DecodeState,
    choose_block,
    expected_tokens,
    record,
)
from infer.sampling import SamplingParams
from orthrus_jax.memory import tree_bytes
from tests.infer.test_decode import _gen, _prompts, _run

M = 5  # statistics over block sizes 1 .. 5
BLOCKS = (5, 1)
# Seconds per iteration: AR 1, block 5 3.0 (pays from 3 tokens per iteration).
COSTS = np.array([1.0, 2.0, 2.5, 2.8, 3.0], np.float32)
PRIOR = np.array([1.0, 1.8, 2.5, 3.2, 3.6], np.float32)


def _state(batch: int) -> DecodeState:
    """A state as ``start`` makes it (the counts one iteration of the prior); only the
    fields the controller reads and ``record`` writes are meaningful."""
    z = jnp.zeros((batch,), jnp.int32)
    return DecodeState(cache=None, anchor=z, tokens=jnp.zeros((batch, 1), jnp.int32),
                       num_generated=z, finish=z, key=None, iterations=z,
                       accepted_hist=jnp.zeros((batch, M), jnp.int32),
                       block_hist=jnp.zeros((batch, M), jnp.int32),
                       seen_tokens=jnp.tile(jnp.asarray(PRIOR), (batch, 1)),
                       seen_iterations=jnp.ones((batch, M), jnp.float32), ar_run=z,
                       step=jnp.int32(0))


def _inputs(prior=PRIOR, costs=COSTS) -> DecodeInputs:
    return DecodeInputs(jnp.ones((1,), jnp.int32), jnp.full((8,), -1, jnp.int32),
                        SamplingParams.make(0.0), jnp.asarray(prior), jnp.asarray(costs))


@jax.jit
def _choose(state, inputs):
    return choose_block(state, inputs, BLOCKS)


def _drive(accept, steps: int, batch: int = 1, state=None, inputs=None):
    """Run the controller ``steps`` iterations: at block 5 a row commits ``accept(t, row)``
    tokens (1 .. 5), at an AR step 1. Returns the sizes chosen and the final state."""
    state = _state(batch) if state is None else state
    inputs = inputs or _inputs()
    active = jnp.ones((batch,), bool)
    chosen = []
    for t in range(steps):
        k = BLOCKS[int(_choose(state, inputs))]
        chosen.append(k)
        tokens = [accept(t, b) if k > 1 else 1 for b in range(batch)]
        state = record(state, active, jnp.asarray(tokens, jnp.int32), k)
    return chosen, state


def test_choice_is_deterministic_and_follows_expected_tokens_per_second():
    state = _state(2)  # row 0: the prior and one iteration of 4 tokens; row 1: three of 1
    state = dataclasses.replace(
        state, seen_tokens=state.seen_tokens.at[0, 4].set(3.6 + 4.0).at[1, 4].set(3.6 + 3.0),
        seen_iterations=state.seen_iterations.at[0, 4].set(2.0).at[1, 4].set(4.0))
    e = np.asarray(expected_tokens(state))
    np.testing.assert_allclose(e[:, 0], 1.0)  # an AR step commits one token
    np.testing.assert_allclose(e[:, 4], [(4.0 + 3.6) / 2, (3.0 + 3.6) / 4])
    # each row alone: row 0 drafts (3.8 tokens / 3 s > 1 / 1 s), row 1 does not (1.65 / 3)
    for row, want in ((0, 5), (1, 1)):
        alone = jax.tree.map(lambda a, r=row: a[r:r + 1] if a.ndim else a, state)
        assert BLOCKS[int(_choose(alone, _inputs()))] == want
    # together: (3.8 + 1.65) tokens per 3 s = 1.82/s, less than 2 rows x 1 token per 1 s
    assert BLOCKS[int(_choose(state, _inputs()))] == 1
    # a finished row does not count
    done = dataclasses.replace(state, finish=jnp.asarray([0, 1], jnp.int32))
    assert BLOCKS[int(_choose(done, _inputs()))] == 5
    # deterministic: the same inputs, the same choice
    assert all(int(_choose(state, _inputs())) == int(_choose(state, _inputs()))
               for _ in range(3))
    # a cheaper block changes the choice: 5.45 tokens per 2 s
    assert BLOCKS[int(_choose(state, _inputs(costs=np.r_[COSTS[:4], 2.0])))] == 5


def test_poor_acceptance_falls_back_and_predictable_text_returns_within_a_bound():
    switch = 30  # iterations of poor acceptance (1 token), then every draft accepted (5)
    chosen, state = _drive(lambda t, b: 1 if t < switch else 5, 80)
    first_ar = chosen.index(1)
    assert first_ar <= 2  # two poor iterations outweigh the prior
    # while the text is poor: mostly AR steps, a probe at most every PROBE_AFTER + 1
    poor = chosen[first_ar:switch]
    assert poor.count(1) >= len(poor) * PROBE_AFTER / (PROBE_AFTER + 1) - 1
    runs = "".join("a" if k == 1 else "b" for k in poor).split("b")
    assert max(len(r) for r in runs) <= PROBE_AFTER
    # predictable again: a probe within PROBE_AFTER + 1 iterations, and drafting for good
    # within two probes (the second full acceptance outweighs the decayed poor counts)
    assert 5 in chosen[switch:switch + PROBE_AFTER + 1]
    back = max(t for t in range(switch, 80) if chosen[t] == 1) + 1
    assert back - switch <= 2 * (PROBE_AFTER + 1)
    assert all(k == 5 for k in chosen[back:])
    assert int(state.block_hist[0, 4]) + int(state.block_hist[0, 0]) == 80


def test_rows_keep_their_own_statistics():
    # row 0 accepts everything, row 1 nothing: row 0's drafting carries the batch
    chosen, state = _drive(lambda t, b: 5 if b == 0 else 1, 20, batch=2)
    assert chosen.count(5) == 20
    e = np.asarray(expected_tokens(state))
    # the prior has faded (0.7 ** 20): each row's own acceptance
    np.testing.assert_allclose(e[:, 4], [5.0, 1.0], atol=1e-3)
    # statistics of the smaller sizes follow from the same iterations: min(accepted, k)
    np.testing.assert_allclose(e[:, 2], [3.0, 1.0], atol=1e-3)


def test_a_wrong_prior_fades():
    """A prior that promises every draft accepted cannot keep a row drafting on text
    whose drafts are all rejected, however cheap the block."""
    cheap = np.r_[COSTS[:4], 1.8]
    optimistic = np.array([1.0, 2.0, 3.0, 4.0, 5.0], np.float32)
    chosen, _ = _drive(lambda t, b: 1, 40, inputs=_inputs(prior=optimistic, costs=cheap),
                       state=dataclasses.replace(
                           _state(1), seen_tokens=jnp.asarray(optimistic)[None]))
    assert chosen[0] == 5 and chosen[-20:].count(1) >= 20 * PROBE_AFTER // (PROBE_AFTER + 1)


def test_run_without_a_limit_continues_a_state_past_step_zero():
    """``run`` counts its steps from the state's own step, so the no-limit count cannot
    overflow (it did: ``step + NO_LIMIT`` wrapped to a negative limit and the loop
    stopped at once)."""
    gen = _gen("agree")
    prompts = _prompts(seed=41, n=2)
    want = _run(gen, prompts, "orthrus", 2, max_new_tokens=12)
    spec = gen.program_keys(prompts, max_new_tokens=12, batch_size=2)[0]
    start_c, run_c = gen.compile(spec)
    inputs = DecodeInputs(jnp.full((2,), 12, jnp.int32), jnp.full((8,), -1, jnp.int32),
                          SamplingParams.make(0.0))
    padded = np.zeros((2, spec.prompt_len), np.int32)
    for i, p in enumerate(prompts):
        padded[i, :len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    state = start_c(gen.model, jnp.asarray(padded), lengths, inputs, jax.random.key(0),
                    jnp.arange(2, dtype=jnp.int32))
    state = run_c(gen.model, state, inputs, jnp.int32(2))  # two iterations: step 2
    assert int(state.step) == 2 and not bool(state.done.all())
    state = run_c(gen.model, state, inputs, jnp.int32(NO_LIMIT))
    assert bool(state.done.all())
    for i, r in enumerate(want):
        assert np.asarray(state.tokens)[i, :int(state.num_generated[i])].tolist() == r.token_ids


def test_a_loop_choosing_among_sizes_updates_the_cache_in_place():
    """The steps of every size run in loops of their own, not as branches of a
    conditional: XLA passes a conditional's whole state through copies, the cache
    included, every iteration (on the CPU an AR step then cost a fifth more than in the
    AR program). The adaptive program needs no more scratch memory than its drafting
    size alone, well under one cache more, with chains and with trees."""
    gen = _gen("agree")
    for budget in (0, 7):
        fixed, adaptive = (gen.compile(gen.spec("orthrus", blocks, True, 2, 16, 32, 8, budget))
                           for blocks in ((5,), (5, 1)))
        cache = tree_bytes(adaptive[0].out_info.cache)
        scratch = [run_c.memory_analysis().temp_size_in_bytes for _, run_c in (fixed, adaptive)]
        assert scratch[1] - scratch[0] < cache / 4, (budget, scratch, cache)
