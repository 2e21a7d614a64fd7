"""Token selection: the temperature / top-k / top-p transform, and the acceptance rules of
docs/decoding.md (greedy prefix match and speculative rejection sampling).

Sampling parameters are traced scalars, so changing them never recompiles. ``top_k = 0``
and ``top_p = 1`` disable those filters.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_NEG = -1e30


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingParams:
    """``temperature`` (0 = greedy), ``top_k`` (0 = off), ``top_p`` (1 = off): scalars."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array

    @classmethod
    def make(cls, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p} must be in (0, 1]")
        if top_k < 0:
            raise ValueError(f"top_k={top_k} must be >= 0 (0 = off)")
        return cls(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))


def filtered_log_probs(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Log-probabilities ``[..., V]`` after temperature, top-k and top-p (float32).

    Filtered-out tokens get probability 0 (log-probability ``-1e30``). Requires
    ``temperature > 0``.
    """
    x = logits.astype(jnp.float32) / params.temperature
    V = x.shape[-1]
    sorted_x = jnp.sort(x, axis=-1)[..., ::-1]  # descending
    k = jnp.where(params.top_k > 0, jnp.minimum(params.top_k, V), V)
    kth = jnp.take_along_axis(sorted_x, jnp.broadcast_to(k - 1, x.shape[:-1])[..., None], -1)
    sorted_x = jnp.where(sorted_x >= kth, sorted_x, _NEG)
    # top-p over the top-k survivors: keep the smallest prefix whose mass reaches top_p
    sorted_p = jax.nn.softmax(sorted_x, axis=-1)
    before = jnp.cumsum(sorted_p, axis=-1) - sorted_p  # mass strictly before each token
    # top_p = 1 keeps everything: in float32 ``before`` can round up to 1 for tokens of
    # probability below ~1e-7, which ``before < 1`` alone would drop
    keep = ((before < params.top_p) | (params.top_p >= 1.0)) & (sorted_x > _NEG)
    cutoff = jnp.min(jnp.where(keep, sorted_x, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where((x >= cutoff) & (x >= kth), x, _NEG)
    return jax.nn.log_softmax(x, axis=-1)


def sample(key: jax.Array, log_probs: jax.Array) -> jax.Array:
    """One token id per leading index of ``log_probs [..., V]``."""
    return jax.random.categorical(key, log_probs, axis=-1).astype(jnp.int32)


def greedy_accept(drafts: jax.Array, verify_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Greedy acceptance. ``drafts [B, K-1]``; ``verify_logits [B, K, V]`` where position
    ``i`` predicts the token after draft ``i`` (``i = 0``: after the anchor).

    Returns ``(j [B], next_anchor [B])``: ``j`` = longest prefix with
    ``drafts[i] == argmax p_i``; the next anchor is ``argmax p_j``.
    """
    target = jnp.argmax(verify_logits, axis=-1).astype(jnp.int32)  # [B, K]
    j = _prefix_length(drafts == target[:, :-1])
    return j, jnp.take_along_axis(target, j[:, None], axis=1)[:, 0]


def speculative_accept(key: jax.Array, drafts: jax.Array, draft_logp: jax.Array,
                       verify_logp: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rejection sampling on filtered log-probabilities.

    ``drafts [B, K-1]`` were sampled from ``q = exp(draft_logp) [B, K-1, V]``;
    ``p = exp(verify_logp) [B, K, V]``. Draft ``i`` is accepted with probability
    ``min(1, p_i(d) / q_i(d))`` until the first rejection ``j``, where the next anchor is
    drawn from ``normalize(max(p_j - q_j, 0))`` (from ``p_j`` if that has no mass); if all
    are accepted, from ``p_{K-1}``. Returns ``(j [B], next_anchor [B])``.
    """
    B, Km1 = drafts.shape
    k_accept, k_next = jax.random.split(key)
    lp = jnp.take_along_axis(verify_logp[:, :-1], drafts[..., None], -1)[..., 0]
    lq = jnp.take_along_axis(draft_logp, drafts[..., None], -1)[..., 0]
    u = jax.random.uniform(k_accept, (B, Km1))
    j = _prefix_length(jnp.log(u) < lp - lq)
    p_j = jnp.exp(jnp.take_along_axis(verify_logp, j[:, None, None], 1)[:, 0])  # [B, V]
    q_pad = jnp.concatenate([jnp.exp(draft_logp), jnp.zeros_like(p_j)[:, None]], axis=1)
    q_j = jnp.take_along_axis(q_pad, j[:, None, None], 1)[:, 0]  # zero when all accepted
    residual = jnp.maximum(p_j - q_j, 0.0)
    mass = residual.sum(-1, keepdims=True)
    dist = jnp.where(mass > 0, residual, p_j)
    return j, sample(k_next, jnp.log(dist))  # log 0 = -inf: never drawn


def _prefix_length(ok: jax.Array) -> jax.Array:
    """Number of leading True values per row of ``ok [B, N]``."""
    return jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)
