"""The decode loops: Orthrus draft-and-verify and plain AR, each one ``lax.while_loop``
over a :class:`DecodeState` pytree.

One Orthrus iteration (SPEC section 3), for every active row at once:

1. draft: the diffusion view on ``[anchor, MASK x (K-1)]`` at the row's own position;
2. verify: the AR view on ``[anchor, d_1 .. d_{K-1}]``, writing their K/V into the cache;
3. accept ``j`` drafts (greedy prefix match, or rejection sampling) and pick the next
   anchor; the row's cache length becomes ``n + j + 1``: rollback moves a length only.

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
    key: jax.Array  # PRNG key
    iterations: jax.Array  # [B] loop iterations the row was active in
    accepted_hist: jax.Array  # [B, K] iterations whose verify accepted j drafts, at j
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


def _is_eos(tokens: jax.Array, eos_ids: jax.Array) -> jax.Array:
    return jnp.any(tokens[..., None] == eos_ids, axis=-1)


def _pick(key: jax.Array, logits: jax.Array, sampling: SamplingParams, greedy: bool):
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return sample(key, filtered_log_probs(logits, sampling))


def _commit(state: DecodeState, new: jax.Array, count: jax.Array, cache: KVCache,
            old_lengths: jax.Array, inputs: DecodeInputs) -> DecodeState:
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
    return dataclasses.replace(
        state, cache=KVCache(cache.k, cache.v, lengths),
        anchor=jnp.where(active, last, state.anchor), tokens=tokens,
        num_generated=num_generated, finish=finish,
        iterations=state.iterations + active.astype(jnp.int32),
        accepted_hist=state.accepted_hist.at[jnp.arange(new.shape[0]), accepted - 1].add(
            active.astype(jnp.int32)),
        step=state.step + 1)


def orthrus_step(model: OrthrusLM, state: DecodeState, inputs: DecodeInputs,
                 greedy: bool) -> DecodeState:
    """One draft + verify + accept iteration for every active row."""
    c = model.config
    K = c.block_size
    B = state.anchor.shape[0]
    key, k_draft, k_accept = jax.random.split(state.key, 3)
    cache = state.cache
    block = jnp.concatenate(
        [state.anchor[:, None], jnp.full((B, K - 1), c.mask_token_id, jnp.int32)], axis=1)
    q_logits = model.logits(model.diffusion_forward(block, cache)[:, :-1])  # [B, K-1, V]
    if greedy:
        drafts = jnp.argmax(q_logits, axis=-1).astype(jnp.int32)
    else:
        q_logp = filtered_log_probs(q_logits, inputs.sampling)
        drafts = sample(k_draft, q_logp)
    hidden, verified = model.forward(jnp.concatenate([state.anchor[:, None], drafts], 1), cache)
    p_logits = model.logits(hidden)  # [B, K, V]
    if greedy:
        j, nxt = greedy_accept(drafts, p_logits)
    else:
        j, nxt = speculative_accept(k_accept, drafts, q_logp,
                                    filtered_log_probs(p_logits, inputs.sampling))
    # New tokens d_1 .. d_j then the next anchor; j + 1 of them.
    new = jnp.where(jnp.arange(K)[None, :] == j[:, None], nxt[:, None],
                    jnp.concatenate([drafts, drafts[:, :1]], axis=1))
    state = dataclasses.replace(state, key=key)
    return _commit(state, new, j + 1, verified, cache.lengths, inputs)


def ar_step(model: OrthrusLM, state: DecodeState, inputs: DecodeInputs,
            greedy: bool) -> DecodeState:
    """One plain AR step for every active row: the baseline in the same engine."""
    key, k_pick = jax.random.split(state.key)
    hidden, cache = model.forward(state.anchor[:, None], state.cache)
    nxt = _pick(k_pick, model.logits(hidden[:, 0]), inputs.sampling, greedy)
    state = dataclasses.replace(state, key=key)
    return _commit(state, nxt[:, None], jnp.ones_like(nxt), cache, state.cache.lengths, inputs)


def start(model: OrthrusLM, prompts: jax.Array, prompt_lengths: jax.Array, inputs: DecodeInputs,
          key: jax.Array, *, max_len: int, out_len: int, greedy: bool, block: int,
          chunk_size: int | None = None, mesh: Mesh | None = None,
          rules: Rules | None = None) -> DecodeState:
    """Prefill right-padded ``prompts [B, P]`` and pick each row's first token.

    ``block``: the most tokens one iteration commits (K for Orthrus, 1 for AR), the size
    of the acceptance histogram.

    With ``mesh``, the cache is laid out by the logical-axis ``rules`` (batch over the
    data axes, KV heads over ``tensor``), matching a model placed with the same rules.
    """
    c = model.config
    B = prompts.shape[0]
    cache = init_cache(c, B, max_len, mesh=mesh, rules=rules)
    logits, cache = prefill(model, prompts, cache, prompt_lengths, chunk_size)
    key, k_first = jax.random.split(key)
    first = _pick(k_first, logits, inputs.sampling, greedy)
    zeros = jnp.zeros((B,), jnp.int32)
    state = DecodeState(cache=cache, anchor=first, tokens=jnp.zeros((B, out_len), jnp.int32),
                        num_generated=zeros, finish=zeros, key=key, iterations=zeros,
                        accepted_hist=jnp.zeros((B, block), jnp.int32), step=jnp.int32(0))
    state = _commit(state, first[:, None], jnp.ones_like(first), cache, cache.lengths, inputs)
    # The first token is the anchor: generated, not yet in the cache.
    return dataclasses.replace(state, cache=cache, iterations=zeros, step=jnp.int32(0),
                               accepted_hist=jnp.zeros_like(state.accepted_hist))


def run(model: OrthrusLM, state: DecodeState, inputs: DecodeInputs, max_steps: jax.Array, *,
        mode: str, greedy: bool) -> DecodeState:
    """Iterate until every row is done or ``max_steps`` more iterations have run."""
    step_fn = {"orthrus": orthrus_step, "ar": ar_step}[mode]
    limit = state.step + max_steps

    def cond(s: DecodeState) -> jax.Array:
        return jnp.any(~s.done) & (s.step < limit)

    return jax.lax.while_loop(cond, lambda s: step_fn(model, s, inputs, greedy), state)
