"""The decode loops: Orthrus draft-and-verify and plain AR, each one ``lax.while_loop``
over a :class:`DecodeState` pytree, compiled per :class:`infer.buckets.DecodeSpec`.

One Orthrus iteration (docs/decoding.md), for every active row at once:

1. :func:`draft`: the diffusion view on ``[anchor, MASK x (K-1)]`` at the row's own
   position proposes ``K - 1`` tokens;
2. :func:`verify_and_accept`: the AR view on ``[anchor, d_1 .. d_{K-1}]``, writing their
   K/V into the cache, accepts ``j`` drafts (greedy prefix match, or rejection sampling)
   and picks the next anchor;
3. :func:`commit`: the row's tokens and cache length advance by ``j + 1`` (rollback moves
   a length only), cut at an end-of-sequence id, the budget and the cache's capacity;
   :func:`record` updates the histograms and the controller's statistics.

With a tree budget (``spec.tree_budget``), :func:`draft_tree` and :func:`verify_tree` take
the places of steps 1 and 2: the same diffusion pass builds a tree of that many drafted
nodes per row (:mod:`infer.tree`), one AR pass verifies every node against its own
ancestors, and the accepted path's K/V are written at the row's next positions.

The block size ``K`` is a decode-time choice, independent of the size the diffusion view
was trained at: ``K - 1`` drafts per iteration, ``K = 1`` is a plain AR step. Given
several sizes, :func:`run` picks one per iteration inside the loop (:func:`choose_block`;
each size's steps run in an inner loop of their own while it stays chosen, so the cache
is updated in place as in a one-size loop): the size with the most expected tokens per
second over the batch. Each row keeps decayed counts of what drafting committed for it
lately (starting from the prior of the head's acceptance profile, which fades like any
count), and a row that has run ``PROBE_AFTER`` plain AR steps in a row drafts once more,
so a row whose text becomes predictable again returns to drafting within a bounded
number of steps. Greedy output never depends on the choice.

Rows stop on their own: an end-of-sequence id, their ``max_new_tokens``, or a cache that
could not hold another token. Finished rows keep riding along, masked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from infer import tree as trees
from infer.buckets import DecodeSpec
from infer.sampling import (
    SamplingParams,
    argmax,
    filtered_log_probs,
    greedy_accept,
    sample,
    speculative_accept,
)
from orthrus_jax.cache import KVCache, attention_windows, init_cache, write_rows
from orthrus_jax.model import OrthrusLM, prefill
from orthrus_jax.sharding import Rules

# finish codes
RUNNING, FINISH_EOS, FINISH_LENGTH, FINISH_CACHE = 0, 1, 2, 3
FINISH_REASONS = {RUNNING: None, FINISH_EOS: "eos", FINISH_LENGTH: "length",
                  FINISH_CACHE: "cache_full"}

# The block-size controller (see the module doc and docs/decoding.md): how fast a row's
# counts at a block size fade with each iteration that observes that size, how many
# iterations the prior is worth when a row starts (it fades like any observation), and
# after how many consecutive AR steps a row drafts again to see whether its text has
# become predictable.
CONTROL_DECAY = 0.7
PRIOR_WEIGHT = 1.0
PROBE_AFTER = 8


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """Everything the loop carries. ``B`` rows, output room ``N`` tokens, statistics over
    block sizes ``1 .. M`` (``M = spec.max_block``, size ``k`` at index ``k - 1``). Every
    field but ``step`` is per row (leading axis ``B``; the cache's batch axis)."""

    cache: KVCache
    anchor: jax.Array  # [B] newest generated token, not yet in the cache
    tokens: jax.Array  # [B, N] generated tokens (the first from prefill)
    num_generated: jax.Array  # [B]
    finish: jax.Array  # [B] finish code, RUNNING while active
    key: jax.Array  # [B] PRNG key per row (a row's draws never depend on its neighbours)
    iterations: jax.Array  # [B] loop iterations the row was active in
    accepted_hist: jax.Array  # [B, M] iterations whose verify accepted j drafts, at j
    block_hist: jax.Array  # [B, M] iterations the row ran at block size k, at k - 1
    seen_tokens: jax.Array  # [B, M] decayed tokens committed per iteration at size k
    seen_iterations: jax.Array  # [B, M] decayed iterations observed at size k
    ar_run: jax.Array  # [B] consecutive plain AR steps the row has run
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
    prior: jax.Array | None = None  # [M] expected tokens per iteration at size k, at k - 1
    costs: jax.Array | None = None  # [M] seconds per iteration at size k, at k - 1
    # Only for a tree budget: how the trees score candidates (None: their log-probability).
    tree_scoring: trees.TreeScoring | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Draft:
    """What :func:`draft` proposes for each row: ``tokens [B, K-1]``, and for a sampling
    program the filtered log-probabilities ``[B, K-1, V]`` they were drawn from (the
    ``q`` of rejection sampling; None in a greedy program)."""

    tokens: jax.Array
    log_probs: jax.Array | None = None


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


# Sampling. A greedy program (``spec.greedy``) holds none of this code. A sampling program
# serves rows of any temperature: its temperature-0 rows take the argmax, and when every
# row is at temperature 0 a ``lax.cond`` skips the draws.
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


def pick(keys: jax.Array | None, logits: jax.Array, sampling: SamplingParams,
         greedy: bool) -> jax.Array:
    """Next token of each row from ``logits [B, V]``: argmax (``greedy``, or a row at
    temperature 0), else a draw with the row's key of ``keys [B]``."""
    best = argmax(logits)
    if greedy:
        return best
    greedy_rows = _greedy_rows(sampling, logits.shape[0])
    drawn = jax.lax.cond(
        jnp.all(greedy_rows), lambda: best,
        lambda: _sample_rows(keys, filtered_log_probs(logits, _safe(sampling))))
    return jnp.where(greedy_rows, best, drawn)


# One iteration.
def draft_logits(model: OrthrusLM, state: DecodeState, block: int) -> jax.Array:
    """The diffusion view's float32 logits ``[B, block - 1, V]`` for the ``block - 1``
    positions after each row's anchor: one pass over ``[anchor, MASK x (block - 1)]`` at
    the row's cache length, writing nothing."""
    B = state.anchor.shape[0]
    masks = jnp.full((B, block - 1), model.config.mask_token_id, jnp.int32)
    return model.logits(model.diffusion_hidden(
        jnp.concatenate([state.anchor[:, None], masks], axis=1), state.cache)[:, :-1])


def draft(model: OrthrusLM, state: DecodeState, inputs: DecodeInputs, block: int,
          greedy: bool, keys: jax.Array | None = None) -> Draft:
    """The proposer: ``block - 1`` draft tokens per row from one diffusion pass over
    ``[anchor, MASK x (block - 1)]`` at the row's cache length; writes nothing. ``keys
    [B]``: each row's draw key (sampling programs)."""
    B = state.anchor.shape[0]
    q_logits = draft_logits(model, state, block)
    tokens = argmax(q_logits)  # [B, block - 1]
    if greedy:
        return Draft(tokens)
    greedy_rows = _greedy_rows(inputs.sampling, B)
    all_greedy = jnp.all(greedy_rows)  # then skip every draw
    q_logp = jax.lax.cond(all_greedy, lambda x: jnp.zeros(x.shape, jnp.float32),
                          lambda x: filtered_log_probs(x, _safe(inputs.sampling)), q_logits)
    drawn = jax.lax.cond(all_greedy, lambda: tokens, lambda: _sample_rows(keys, q_logp))
    return Draft(jnp.where(greedy_rows[:, None], tokens, drawn), q_logp)


def verify_and_accept(model: OrthrusLM, state: DecodeState, proposal: Draft,
                      inputs: DecodeInputs, greedy: bool, keys: jax.Array | None = None
                      ) -> tuple[jax.Array, jax.Array, KVCache]:
    """The verifier: one AR pass over ``[anchor, drafts]`` writes their K/V after each
    row's cache length, then accepts the longest agreeing prefix (greedy) or by rejection
    sampling (``keys [B]``). Returns ``new [B, K]`` (the accepted drafts, then the next
    anchor at index ``j``; entries past it are filler), ``count = j + 1 [B]`` and the
    cache with the K/V written (its lengths not yet advanced)."""
    drafts = proposal.tokens
    B, K = drafts.shape[0], drafts.shape[1] + 1
    hidden, verified = model.ar_hidden(
        jnp.concatenate([state.anchor[:, None], drafts], axis=1), state.cache)
    p_logits = model.logits(hidden)  # [B, K, V]
    j, nxt = greedy_accept(drafts, p_logits)
    if not greedy:
        greedy_rows = _greedy_rows(inputs.sampling, B)
        j_s, nxt_s = jax.lax.cond(
            jnp.all(greedy_rows), lambda: (j, nxt),
            lambda: _accept_rows(keys, drafts, proposal.log_probs,
                                 filtered_log_probs(p_logits, _safe(inputs.sampling))))
        j, nxt = jnp.where(greedy_rows, j, j_s), jnp.where(greedy_rows, nxt, nxt_s)
    new = jnp.where(jnp.arange(K)[None, :] == j[:, None], nxt[:, None],
                    jnp.concatenate([drafts, drafts[:, :1]], axis=1))
    return new, j + 1, dataclasses.replace(verified, lengths=state.cache.lengths)


def draft_tree(model: OrthrusLM, state: DecodeState, block: int, budget: int,
               scoring: trees.TreeScoring | None = None) -> trees.Tree:
    """The tree proposer: ``budget`` nodes of depth at most ``block - 1`` per row, built
    best-first (:func:`infer.tree.build`, scored by ``scoring``) from one diffusion pass's
    distributions.

    A tree of ``budget`` nodes is at most ``budget`` deep, so the diffusion pass drafts
    ``min(block, budget + 1)`` positions: a small tree does not pay for a long block."""
    block = min(block, budget + 1)
    return trees.build(jax.nn.log_softmax(draft_logits(model, state, block), axis=-1), budget,
                       scoring=scoring)


def verify_tree(model: OrthrusLM, state: DecodeState, tree: trees.Tree, inputs: DecodeInputs,
                block: int, greedy: bool, keys: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array, KVCache]:
    """The tree verifier: one AR pass over ``[anchor, nodes]`` (each node sees the cache
    and its ancestors), then the walk of :func:`infer.tree.walk` on the AR view's argmax
    at every row, or for sampled rows on a draw from its filtered distribution at every
    row (independent keys from ``keys [B]``: the accepted tokens and the next anchor are
    then distributed exactly as AR sampling). Only the accepted path's K/V enter the cache,
    at the positions after each row's length. Returns ``new [B, block]``, ``count = j + 1
    [B]`` and the cache (lengths not yet advanced), like :func:`verify_and_accept`."""
    hidden, (new_k, new_v) = model.tree_hidden(tree.rows(state.anchor), tree.offsets,
                                               tree.visible, state.cache)
    p_logits = model.logits(hidden)  # [B, N + 1, V]
    chosen = argmax(p_logits)
    if not greedy:
        B, T = chosen.shape
        greedy_rows = _greedy_rows(inputs.sampling, B)

        def draws():
            logp = filtered_log_probs(p_logits, _safe(inputs.sampling))
            return jax.vmap(lambda k, lp: jax.vmap(sample)(jax.random.split(k, T), lp))(
                keys, logp)
        drawn = jax.lax.cond(jnp.all(greedy_rows), lambda: chosen, draws)
        chosen = jnp.where(greedy_rows[:, None], chosen, drawn)
    new, count, path = trees.walk(tree, state.anchor, chosen, block - 1)
    return new, count, write_rows(state.cache, new_k, new_v, path)


def commit(state: DecodeState, new: jax.Array, count: jax.Array, cache: KVCache,
           inputs: DecodeInputs) -> DecodeState:
    """Append ``new[b, :count[b]]`` to each active row, cut at the first EOS, at the
    budget and at the cache's capacity; advance the row's cache length by what was
    appended (``cache.lengths`` are the lengths before), make the last token the anchor and
    finish rows that are done.

    Near a full cache the verify block's last K/V fall past ``max_len`` and are dropped;
    the tokens before them are exact (the verify pass is causal), so both modes commit
    up to the last cache position and stop on the same token.
    """
    active = ~state.done
    K = new.shape[1]
    idx = jnp.arange(K)[None, :]
    eos_at = jnp.where(_is_eos(new, inputs.eos_ids) & (idx < count[:, None]), idx, K)
    first_eos = jnp.min(eos_at, axis=1)
    budget = inputs.max_new_tokens - state.num_generated
    count = jnp.minimum(jnp.minimum(count, first_eos + 1), budget)
    count = jnp.minimum(count, cache.max_len - cache.lengths)
    count = jnp.where(active, count, 0)
    positions = jnp.where(idx < count[:, None], state.num_generated[:, None] + idx,
                          state.tokens.shape[1])  # out of range: dropped
    rows = jnp.arange(new.shape[0])[:, None]
    num_generated = state.num_generated + count
    lengths = cache.lengths + count
    finish = state.finish
    finish = jnp.where(active & (first_eos < count), FINISH_EOS, finish)  # EOS committed
    finish = jnp.where((finish == RUNNING) & (num_generated >= inputs.max_new_tokens),
                       FINISH_LENGTH, finish)
    finish = jnp.where((finish == RUNNING) & (lengths >= cache.max_len), FINISH_CACHE, finish)
    last = jnp.take_along_axis(new, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
    return dataclasses.replace(
        state, cache=dataclasses.replace(cache, lengths=lengths),
        anchor=jnp.where(active, last, state.anchor),
        tokens=state.tokens.at[rows, positions].set(new, mode="drop"),
        num_generated=num_generated, finish=finish)


def record(state: DecodeState, active: jax.Array, accepted: jax.Array,
           block: int) -> DecodeState:
    """Count one iteration at size ``block`` for the ``active [B]`` rows, which committed
    ``accepted [B]`` tokens before any cut (``j + 1``): iterations, histograms, the
    controller's statistics and the loop's step.

    An iteration at ``block`` also tells what every smaller size would have committed
    (``min(accepted, k)``: the first drafts are those a smaller block proposes), so it
    updates the statistics of sizes ``2 .. block`` (decayed by ``CONTROL_DECAY``)."""
    on = active.astype(jnp.int32)
    sizes = jnp.arange(1, state.seen_tokens.shape[1] + 1)[None, :]
    seen = active[:, None] & (sizes >= 2) & (sizes <= block)
    rows = jnp.arange(active.shape[0])
    return dataclasses.replace(
        state,
        iterations=state.iterations + on,
        accepted_hist=state.accepted_hist.at[rows, accepted - 1].add(on),
        block_hist=state.block_hist.at[:, block - 1].add(on),
        seen_tokens=jnp.where(seen, CONTROL_DECAY * state.seen_tokens
                              + jnp.minimum(accepted[:, None], sizes), state.seen_tokens),
        seen_iterations=jnp.where(seen, CONTROL_DECAY * state.seen_iterations + 1,
                                  state.seen_iterations),
        ar_run=jnp.where(active, state.ar_run + 1 if block == 1 else 0, state.ar_run),
        step=state.step + 1)


def orthrus_step(model: OrthrusLM, state: DecodeState, inputs: DecodeInputs, block: int,
                 greedy: bool, tree_budget: int = 0) -> DecodeState:
    """One draft + verify + accept iteration for every active row, drafting ``block - 1``
    positions (``block`` need not be the size the diffusion view was trained at): a chain,
    or with ``tree_budget`` a tree of that many nodes."""
    k_draft = k_accept = None
    if not greedy:
        k_draft, k_accept = _iteration_keys(state, 2)
    if tree_budget:
        tree = draft_tree(model, state, block, tree_budget, inputs.tree_scoring)
        new, count, cache = verify_tree(model, state, tree, inputs, block, greedy, k_accept)
    else:
        proposal = draft(model, state, inputs, block, greedy, k_draft)
        new, count, cache = verify_and_accept(model, state, proposal, inputs, greedy, k_accept)
    return record(commit(state, new, count, cache, inputs), ~state.done, count, block)


def ar_step(model: OrthrusLM, state: DecodeState, inputs: DecodeInputs,
            greedy: bool) -> DecodeState:
    """One plain AR step for every active row: the baseline in the same engine."""
    hidden, cache = model.ar_hidden(state.anchor[:, None], state.cache)
    keys = None if greedy else _iteration_keys(state, 1)[0]
    nxt = pick(keys, model.logits(hidden[:, 0]), inputs.sampling, greedy)
    ones = jnp.ones_like(nxt)
    cache = dataclasses.replace(cache, lengths=state.cache.lengths)
    return record(commit(state, nxt[:, None], ones, cache, inputs), ~state.done, ones, 1)


# The controller.
def expected_tokens(state: DecodeState) -> jax.Array:
    """``[B, M]`` each row's expected tokens per iteration at size ``k`` (index ``k - 1``):
    its decayed counts, which start as ``PRIOR_WEIGHT`` iterations of the prior
    (:func:`start`) and fade with every observation; 1 for AR steps (and for a size
    with no counts)."""
    n = state.seen_iterations
    e = jnp.where(n > 0, state.seen_tokens / jnp.where(n > 0, n, 1.0), 1.0)
    return e.at[:, 0].set(1.0)


def choose_block(state: DecodeState, inputs: DecodeInputs,
                 blocks: tuple[int, ...]) -> jax.Array:
    """Index into ``blocks`` of the size to run next: the most expected tokens per second
    summed over the active rows (``expected_tokens`` over ``inputs.costs``); if that is
    a plain AR step while an active row has run ``PROBE_AFTER`` AR steps in a row, the
    block drafting the most (a probe). Deterministic in its inputs."""
    idx = jnp.asarray(blocks) - 1
    active = ~state.done
    rate = expected_tokens(state)[:, idx] / inputs.costs[idx]  # [B, n]
    choice = jnp.argmax(jnp.sum(jnp.where(active[:, None], rate, 0.0), axis=0))
    probe = jnp.any(active & (state.ar_run >= PROBE_AFTER)) & (idx[choice] == 0)
    return jnp.where(probe, jnp.argmax(idx), choice).astype(jnp.int32)


def start(model: OrthrusLM, prompts: jax.Array, prompt_lengths: jax.Array,
          inputs: DecodeInputs, keys: jax.Array, spec: DecodeSpec, *, mesh: Mesh | None = None,
          rules: Rules | None = None, cache: KVCache | None = None,
          progress: Callable[[jax.Array, jax.Array], None] | None = None,
          rows: jax.Array | None = None) -> DecodeState:
    """Prefill right-padded ``prompts [B, P]`` and pick each row's first token; ``keys [B]``
    are the rows' PRNG keys (:func:`row_keys`).

    With ``mesh``, the cache is laid out by the logical-axis ``rules`` (batch over the
    data axes, KV heads over ``tensor``), matching a model placed with the same rules.
    ``cache``: rows of ``spec.max_len`` positions that already hold each row's first
    ``cache.lengths[b]`` tokens (a cached prefix); ``prompts`` are then what follows
    (default: an empty cache). ``progress``: see :func:`orthrus_jax.model.prefill`.
    ``rows [B]``: the rows of ``cache`` (of any batch) the prompts go to, in place, its
    ``lengths`` (``[B]``) being theirs; the state's other fields have ``B`` rows.
    """
    c = model.config
    B = prompts.shape[0]
    # Per-layer K/V for a per-layer model (each unrolled layer updates its own array in place).
    # Passes read the smallest attention window holding the live positions.
    if cache is None:
        cache = init_cache(c, B, spec.max_len, mesh=mesh, rules=rules,
                           per_layer=model.per_layer, windows=attention_windows(spec.max_len))
    logits, cache = prefill(model, prompts, cache, prompt_lengths, spec.prefill_chunk,
                            progress, rows)
    first = pick(jax.vmap(jax.random.fold_in)(keys, jnp.zeros((B,), jnp.int32)), logits,
                 inputs.sampling, spec.greedy)
    zeros = jnp.zeros((B,), jnp.int32)
    # the controller's counts start as PRIOR_WEIGHT iterations of the prior
    prior = jnp.zeros((spec.max_block,)) if inputs.prior is None else inputs.prior
    seen = jnp.broadcast_to(PRIOR_WEIGHT * prior, (B, spec.max_block)).astype(jnp.float32)
    weight = jnp.full((B, spec.max_block), PRIOR_WEIGHT if inputs.prior is not None else 0.0,
                      jnp.float32)
    state = DecodeState(cache=cache, anchor=first, tokens=jnp.zeros((B, spec.out_len), jnp.int32),
                        num_generated=zeros, finish=zeros, key=keys, iterations=zeros,
                        accepted_hist=jnp.zeros((B, spec.max_block), jnp.int32),
                        block_hist=jnp.zeros((B, spec.max_block), jnp.int32),
                        seen_tokens=seen, seen_iterations=weight, ar_run=zeros,
                        step=jnp.int32(0))
    # The first token is the anchor: generated, not yet in the cache.
    first_state = commit(state, first[:, None], jnp.ones_like(first), cache, inputs)
    return dataclasses.replace(first_state, cache=cache)


def run(model: OrthrusLM, state: DecodeState, inputs: DecodeInputs, max_steps: jax.Array,
        spec: DecodeSpec) -> DecodeState:
    """Iterate until every row is done or ``max_steps`` more iterations have run
    (:data:`infer.buckets.NO_LIMIT`: until done).

    ``spec.blocks``: the block size of every iteration (``(1,)``: plain AR; ``(K,)``:
    Orthrus drafting ``K - 1`` positions, as a chain or as a tree of ``spec.tree_budget``
    nodes), or several sizes to choose among per iteration
    (:func:`choose_block`, which needs ``inputs.prior`` and ``inputs.costs``). Only
    the sampled rows' random draws depend on the sizes chosen, never their distribution.
    """
    first_step = state.step  # counting from here never overflows, whatever max_steps

    def step_fn(k: int):
        if k == 1:
            return lambda s: ar_step(model, s, inputs, spec.greedy)
        return lambda s: orthrus_step(model, s, inputs, k, spec.greedy, spec.tree_budget)

    def cond(s: DecodeState) -> jax.Array:
        return jnp.any(~s.done) & (s.step - first_step < max_steps)

    if not spec.adaptive:
        return jax.lax.while_loop(cond, step_fn(spec.blocks[0]), state)

    def body(s: DecodeState) -> DecodeState:
        # One inner loop per size, each running while the controller picks its size: the
        # steps update the cache in place as in a single-size loop (a ``lax.switch`` over
        # the steps passes the whole state through a conditional, which XLA copies).
        for i, k in enumerate(spec.blocks):
            s = jax.lax.while_loop(
                lambda t, i=i: cond(t) & (choose_block(t, inputs, spec.blocks) == i),
                step_fn(k), s)
        return s

    return jax.lax.while_loop(cond, body, state)
