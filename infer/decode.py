"""The decode loops: Orthrus draft-and-verify and plain AR, each one ``lax.while_loop``
over a :class:`DecodeState` pytree.

One Orthrus iteration (docs/decoding.md), for every active row at once:

1. draft: the diffusion view on ``[anchor, MASK x (K-1)]`` at the row's own position;
2. verify: the AR view on ``[anchor, d_1 .. d_{K-1}]``, writing their K/V into the cache;
3. accept ``j`` drafts (greedy prefix match, or rejection sampling) and pick the next
   anchor; the row's cache length becomes ``n + j + 1``: rollback moves a length only.

The block size ``K`` is a decode-time choice, independent of the size the diffusion view
was trained at: the loop drafts ``K - 1`` tokens per iteration (``K = 1`` is a plain AR
step). Given several sizes, :func:`run` picks one per iteration inside the loop
(``lax.switch``): the size with the most expected tokens per second, from the tokens per
iteration each size has committed lately (decayed counts, pulled towards a prior from the
head's acceptance profile) and each size's measured cost per iteration. Greedy output does
not depend on the choice.

Rows stop on their own: an end-of-sequence id, their ``max_new_tokens``, or a cache that
could not hold another verify block. Finished rows keep riding along, masked.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from infer.sampling import (
    SamplingParams,
    argmax,
    filtered_log_probs,
    greedy_accept,
    sample,
    speculative_accept,
)
from orthrus_jax.cache import KVCache, init_cache
from orthrus_jax.model import OrthrusLM, prefill
from orthrus_jax.sharding import Rules

# finish codes
RUNNING, FINISH_EOS, FINISH_LENGTH, FINISH_CACHE = 0, 1, 2, 3
FINISH_REASONS = {RUNNING: None, FINISH_EOS: "eos", FINISH_LENGTH: "length",
                  FINISH_CACHE: "cache_full"}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Everything the loop carries. ``B`` rows, output room ``N`` tokens, block ``K``."""

    cache: KVCache
    anchor: jax.Array  # [B] newest generated token, not yet in the cache
    tokens: jax.Array  # [B, N] generated tokens (the first from prefill)
    num_generated: jax.Array  # [B]
    finish: jax.Array  # [B] finish code, RUNNING while active
    key: jax.Array  # [B] PRNG key per row (a row's draws never depend on its neighbours)
    iterations: jax.Array  # [B] loop iterations the row was active in
    accepted_hist: jax.Array  # [B, K] iterations whose verify accepted j drafts, at j
    block_hist: jax.Array  # [B, K] iterations the row ran at block size k, at k - 1
    accept_stats: jax.Array  # [2, K] decayed (tokens, iterations) at block size k, at k - 1
    step: jax.Array  # [] iterations of the loop so far

    @property
    def done(self) -> jax.Array:
        return self.finish != RUNNING


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeInputs:
    """Per-call values that never change the compiled shape."""

    max_new_tokens: jax.Array  # [B] token budget per row (>= 1)
    eos_ids: jax.Array  # [E] end-of-sequence ids, -1 = padding
    sampling: SamplingParams
    # Only for a choice among several block sizes (see ``run``):
    prior: jax.Array | None = None  # [K] expected tokens per iteration at size k, at k - 1
    costs: jax.Array | None = None  # [K] seconds per iteration at size k, at k - 1


# Adaptive block size: how fast old counts fade per iteration at a block and per AR step
# (slower: after a stretch of AR steps the prior brings drafting back, to test whether
# the text has become predictable again), and how many iterations the prior is worth.
STATS_DECAY = 0.9
AR_STATS_DECAY = 0.98
PRIOR_WEIGHT = 1.0


def _is_eos(tokens: jax.Array, eos_ids: jax.Array) -> jax.Array:
    return jnp.any(tokens[..., None] == eos_ids, axis=-1)


def row_keys(base: jax.Array, rows: jax.Array) -> jax.Array:
    """The PRNG key ``[B]`` of each row: ``fold_in(base, rows[b])`` (``base =
    jax.random.key(seed)``), where ``rows`` are the rows' indices within their ``generate``
    call (a server request is row 0)."""
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(rows)


def _iteration_keys(state: DecodeState, n: int) -> jax.Array:
    """``[n, B]`` keys for each row's next iteration: a row's key advances only with its own
    iterations (``fold_in(row key, iterations + 1)``; the first token uses 0)."""
    keys = jax.vmap(jax.random.fold_in)(state.key, state.iterations + 1)
    return jax.vmap(lambda k: jax.random.split(k, n), out_axes=1)(keys)


def _greedy_rows(sampling: SamplingParams, batch: int) -> jax.Array:
    """``[B]`` rows decoded greedily inside a sampling program (temperature 0)."""
    return jnp.broadcast_to(sampling.temperature == 0, (batch,))


def _safe(sampling: SamplingParams) -> SamplingParams:
    """Greedy rows get temperature 1 in the sampled computation (its result is discarded)."""
    t = sampling.temperature
    return dataclasses.replace(sampling, temperature=jnp.where(t > 0, t, 1.0))


def _sample_rows(keys: jax.Array, log_probs: jax.Array) -> jax.Array:
    """One draw per row with the row's own key: ``keys [B]``, ``log_probs [B, ..., V]``."""
    return jax.vmap(sample)(keys, log_probs)


def _accept_rows(keys, drafts, q_logp, p_logp) -> tuple[jax.Array, jax.Array]:
    """:func:`speculative_accept` row by row, each with its own key ``keys [B]``."""
    def one(k, d, q, p):
        j, nxt = speculative_accept(k, d[None], q[None], p[None])
        return j[0], nxt[0]
    return jax.vmap(one)(keys, drafts, q_logp, p_logp)


def _pick(keys: jax.Array, logits: jax.Array, sampling: SamplingParams, greedy: bool):
    """Next token of each row from ``logits [B, V]``: argmax, or a draw with ``keys [B]``
    (argmax for rows at temperature 0)."""
    best = argmax(logits)
    if greedy:
        return best
    greedy_rows = _greedy_rows(sampling, logits.shape[0])
    drawn = jax.lax.cond(  # no draws at all when every row is greedy
        jnp.all(greedy_rows), lambda: best,
        lambda: _sample_rows(keys, filtered_log_probs(logits, _safe(sampling))))
    return jnp.where(greedy_rows, best, drawn)


def _commit(state: DecodeState, new: jax.Array, count: jax.Array, cache: KVCache,
            old_lengths: jax.Array, inputs: DecodeInputs, block: int) -> DecodeState:
    """Append ``new[b, :count[b]]`` to active rows, cut at the first EOS, at the budget
    and at the cache's capacity, set cache lengths to ``old + count`` and finish rows
    that are done.

    Near a full cache the verify block's last K/V fall past ``max_len`` and are dropped;
    the tokens before them are exact (the verify pass is causal), so both modes commit
    up to the last cache position and stop on the same token.
    """
    active = ~state.done
    accepted = count  # j + 1 before any cut: the acceptance-length statistic
    K = new.shape[1]
    idx = jnp.arange(K)[None, :]
    eos_at = jnp.where(_is_eos(new, inputs.eos_ids) & (idx < count[:, None]), idx, K)
    first_eos = jnp.min(eos_at, axis=1)
    budget = inputs.max_new_tokens - state.num_generated
    count = jnp.minimum(jnp.minimum(count, first_eos + 1), budget)
    count = jnp.minimum(count, cache.max_len - old_lengths)
    count = jnp.where(active, count, 0)
    positions = jnp.where(idx < count[:, None], state.num_generated[:, None] + idx,
                          state.tokens.shape[1])  # out of range: dropped
    rows = jnp.arange(new.shape[0])[:, None]
    tokens = state.tokens.at[rows, positions].set(new, mode="drop")
    num_generated = state.num_generated + count
    lengths = jnp.where(active, old_lengths + count, old_lengths)
    finish = state.finish
    finish = jnp.where(active & (first_eos < count), FINISH_EOS, finish)  # EOS committed
    finish = jnp.where((finish == RUNNING) & (num_generated >= inputs.max_new_tokens),
                       FINISH_LENGTH, finish)
    finish = jnp.where((finish == RUNNING) & (lengths >= cache.max_len), FINISH_CACHE, finish)
    last = jnp.take_along_axis(new, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
    rows_b = jnp.arange(new.shape[0])
    return dataclasses.replace(
        state, cache=KVCache(cache.k, cache.v, lengths),
        anchor=jnp.where(active, last, state.anchor), tokens=tokens,
        num_generated=num_generated, finish=finish,
        iterations=state.iterations + active.astype(jnp.int32),
        accepted_hist=state.accepted_hist.at[rows_b, accepted - 1].add(active.astype(jnp.int32)),
        block_hist=state.block_hist.at[:, block - 1].add(active.astype(jnp.int32)),
        accept_stats=_update_stats(state.accept_stats, accepted, active, block),
        step=state.step + 1)


def _update_stats(stats: jax.Array, tokens: jax.Array, active: jax.Array,
                  block: int) -> jax.Array:
    """Decay the ``[2, K]`` (tokens, iterations) counts of every block size and add this
    iteration's at ``block``: ``tokens [B]`` committed per active row (before any cut at
    EOS or the budget)."""
    decay = AR_STATS_DECAY if block == 1 else STATS_DECAY
    row = jnp.stack([jnp.sum(jnp.where(active, tokens, 0)), jnp.sum(active)])
    return (decay * stats).at[:, block - 1].add(row.astype(stats.dtype))


def choose_block(state: DecodeState, inputs: DecodeInputs, blocks: tuple[int, ...]) -> jax.Array:
    """Index into ``blocks`` of the size with the most expected tokens per second: tokens
    per iteration seen lately at each size, with ``PRIOR_WEIGHT`` iterations of the prior."""
    tokens, iterations = state.accept_stats
    expected = (tokens + PRIOR_WEIGHT * inputs.prior) / (iterations + PRIOR_WEIGHT)
    idx = jnp.asarray(blocks) - 1
    return jnp.argmax(expected[idx] / inputs.costs[idx]).astype(jnp.int32)


def orthrus_step(model: OrthrusLM, state: DecodeState, inputs: DecodeInputs,
                 greedy: bool, block: int) -> DecodeState:
    """One draft + verify + accept iteration for every active row, drafting ``block - 1``
    tokens (``block`` need not be the size the diffusion view was trained at)."""
    c = model.config
    K = block
    B = state.anchor.shape[0]
    cache = state.cache
    block = jnp.concatenate(
        [state.anchor[:, None], jnp.full((B, K - 1), c.mask_token_id, jnp.int32)], axis=1)
    q_logits = model.logits(model.diffusion_hidden(block, cache)[:, :-1])  # [B, K-1, V]
    drafts = argmax(q_logits)
    if not greedy:
        k_draft, k_accept = _iteration_keys(state, 2)
        sampling = _safe(inputs.sampling)
        greedy_rows = _greedy_rows(inputs.sampling, B)
        all_greedy = jnp.all(greedy_rows)  # then skip every draw (lax.cond)
        q_logp = jax.lax.cond(all_greedy, lambda x: jnp.zeros(x.shape, jnp.float32),
                              lambda x: filtered_log_probs(x, sampling), q_logits)
        drawn = jax.lax.cond(all_greedy, lambda: drafts,
                             lambda: _sample_rows(k_draft, q_logp))
        drafts = jnp.where(greedy_rows[:, None], drafts, drawn)
    hidden, verified = model.ar_hidden(jnp.concatenate([state.anchor[:, None], drafts], 1), cache)
    p_logits = model.logits(hidden)  # [B, K, V]
    j, nxt = greedy_accept(drafts, p_logits)
    if not greedy:
        j_s, nxt_s = jax.lax.cond(
            all_greedy, lambda: (j, nxt),
            lambda: _accept_rows(k_accept, drafts, q_logp,
                                 filtered_log_probs(p_logits, sampling)))
        j, nxt = jnp.where(greedy_rows, j, j_s), jnp.where(greedy_rows, nxt, nxt_s)
    # New tokens d_1 .. d_j then the next anchor; j + 1 of them.
    new = jnp.where(jnp.arange(K)[None, :] == j[:, None], nxt[:, None],
                    jnp.concatenate([drafts, drafts[:, :1]], axis=1))
    return _commit(state, new, j + 1, verified, cache.lengths, inputs, K)


def ar_step(model: OrthrusLM, state: DecodeState, inputs: DecodeInputs,
            greedy: bool) -> DecodeState:
    """One plain AR step for every active row: the baseline in the same engine."""
    hidden, cache = model.ar_hidden(state.anchor[:, None], state.cache)
    keys = None if greedy else _iteration_keys(state, 1)[0]
    nxt = _pick(keys, model.logits(hidden[:, 0]), inputs.sampling, greedy)
    return _commit(state, nxt[:, None], jnp.ones_like(nxt), cache, state.cache.lengths, inputs,
                   1)


def start(model: OrthrusLM, prompts: jax.Array, prompt_lengths: jax.Array, inputs: DecodeInputs,
          keys: jax.Array, *, max_len: int, out_len: int, greedy: bool, max_block: int,
          chunk_size: int | None = None, mesh: Mesh | None = None,
          rules: Rules | None = None) -> DecodeState:
    """Prefill right-padded ``prompts [B, P]`` and pick each row's first token; ``keys [B]``
    are the rows' PRNG keys (:func:`row_keys`).

    ``max_block``: the most tokens one iteration commits (the head's trained block size
    ``K`` in Orthrus mode, 1 in AR mode), the size of the histograms.

    With ``mesh``, the cache is laid out by the logical-axis ``rules`` (batch over the
    data axes, KV heads over ``tensor``), matching a model placed with the same rules.
    """
    c = model.config
    B = prompts.shape[0]
    # Per-layer K/V for a per-layer model (each unrolled layer updates its own array in place).
    cache = init_cache(c, B, max_len, mesh=mesh, rules=rules, per_layer=model.per_layer)
    logits, cache = prefill(model, prompts, cache, prompt_lengths, chunk_size)
    first = _pick(jax.vmap(jax.random.fold_in)(keys, jnp.zeros((B,), jnp.int32)), logits,
                  inputs.sampling, greedy)
    zeros = jnp.zeros((B,), jnp.int32)
    state = DecodeState(cache=cache, anchor=first, tokens=jnp.zeros((B, out_len), jnp.int32),
                        num_generated=zeros, finish=zeros, key=keys, iterations=zeros,
                        accepted_hist=jnp.zeros((B, max_block), jnp.int32),
                        block_hist=jnp.zeros((B, max_block), jnp.int32),
                        accept_stats=jnp.zeros((2, max_block), jnp.float32),
                        step=jnp.int32(0))
    first_state = _commit(state, first[:, None], jnp.ones_like(first), cache, cache.lengths,
                          inputs, 1)
    # The first token is the anchor: generated, not yet in the cache.
    return dataclasses.replace(first_state, cache=cache, iterations=zeros, step=jnp.int32(0),
                               accepted_hist=state.accepted_hist,
                               block_hist=state.block_hist, accept_stats=state.accept_stats)


def run(model: OrthrusLM, state: DecodeState, inputs: DecodeInputs, max_steps: jax.Array, *,
        blocks: tuple[int, ...], greedy: bool) -> DecodeState:
    """Iterate until every row is done or ``max_steps`` more iterations have run.

    ``blocks``: the block size of every iteration (``(1,)``: plain AR; ``(K,)``: Orthrus
    drafting ``K - 1`` tokens), or several sizes to choose among per iteration
    (:func:`choose_block`, which needs ``inputs.prior`` and ``inputs.costs``). Only
    the sampled rows' random draws depend on the sizes chosen, never their distribution.
    """
    limit = state.step + max_steps

    def step_fn(k: int):
        if k == 1:
            return lambda s: ar_step(model, s, inputs, greedy)
        return lambda s: orthrus_step(model, s, inputs, greedy, k)

    if len(blocks) == 1:
        body = step_fn(blocks[0])
    else:
        branches = [step_fn(k) for k in blocks]

        def body(s: DecodeState) -> DecodeState:
            return jax.lax.switch(choose_block(s, inputs, blocks), branches, s)

    def cond(s: DecodeState) -> jax.Array:
        return jnp.any(~s.done) & (s.step < limit)

    return jax.lax.while_loop(cond, body, state)
