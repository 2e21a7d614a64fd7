"""Token selection: the temperature / top-k / top-p transform, and the acceptance rules of
docs/decoding.md (greedy prefix match and speculative rejection sampling).

Sampling parameters are traced scalars, so changing them never recompiles. ``top_k = 0``
and ``top_p = 1`` disable those filters; with both off the transform is only
``log_softmax(logits / temperature)`` (a ``lax.cond`` skips the filtering work).

The filters never sort the vocabulary: they look at the ``MAX_TOP_K`` largest logits
(``lax.top_k``, a static size). So ``top_k`` is at most ``MAX_TOP_K`` (``make`` refuses
more), and top-p keeps at most the ``MAX_TOP_K`` most likely tokens plus any tied with
the last of them: its mass is still measured against the whole distribution, but a
nucleus that needs more tokens is cut there (the rest is dropped). Whenever the kept set
fits, the result is that of sorting the whole vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_NEG = -1e30
# How many of the largest logits top-k / top-p look at (static). On CPU at [32, 151936],
# lax.top_k with k = 1024 takes ~23 ms (k = 256: ~11 ms), a full sort ~1100 ms.
MAX_TOP_K = 1024


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingParams:
    """``temperature`` (0 = greedy), ``top_k`` (0 = off), ``top_p`` (1 = off): scalars, or
    ``[B]`` arrays of per-row values (the leading axis of the logits)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array

    @classmethod
    def make(cls, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
        """Scalar settings, checked (:meth:`check`)."""
        cls.check(temperature, top_k, top_p)
        return cls(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))

    @staticmethod
    def check(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> None:
        """Raise ``ValueError`` naming the bad setting (no device work)."""
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p} must be in (0, 1]")
        if not 0 <= top_k <= MAX_TOP_K:
            raise ValueError(f"top_k={top_k} must be in [0, MAX_TOP_K={MAX_TOP_K}] (0 = off)")

    def expand(self, ndim: int) -> SamplingParams:
        """The values with trailing unit axes, to broadcast against ``ndim``-d logits."""
        def ex(a: jax.Array) -> jax.Array:
            return a.reshape(a.shape + (1,) * (ndim - a.ndim)) if a.ndim else a
        return SamplingParams(ex(self.temperature), ex(self.top_k), ex(self.top_p))


def filtered_log_probs(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Log-probabilities ``[..., V]`` after temperature, top-k and top-p (float32).

    Keeps the ``top_k`` largest logits (all tied with the ``top_k``-th too), then, by
    descending probability renormalised over those, the smallest prefix whose mass reaches
    ``top_p`` (again with ties), bounded by the ``MAX_TOP_K`` largest (module docstring).
    Filtered-out tokens get probability 0 (log-probability ``-1e30``). Requires
    ``temperature > 0``. Per-row params (``[B]``) filter each row by its own values; the
    filtering work is skipped when no row filters.
    """
    params = params.expand(logits.ndim)
    off = (params.top_k <= 0) & (params.top_p >= 1.0)
    if off.ndim == 0:
        return jax.lax.cond(off, _unfiltered, _filtered, logits, params)

    def rows(x: jax.Array, p: SamplingParams) -> jax.Array:
        return jnp.where(off, _unfiltered(x, p), _filtered(x, p))
    return jax.lax.cond(jnp.all(off), _unfiltered, rows, logits, params)


def _unfiltered(logits: jax.Array, params: SamplingParams) -> jax.Array:
    return jax.nn.log_softmax(logits.astype(jnp.float32) / params.temperature, axis=-1)


def _filtered(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """The top-k / top-p branch of :func:`filtered_log_probs`."""
    x = logits.astype(jnp.float32) / params.temperature
    top_k, top_p = params.top_k, params.top_p
    m = min(MAX_TOP_K, x.shape[-1])
    # the m largest, descending. The barrier keeps XLA (CPU) from folding the slices
    # below into top_k's sort + slice form, which then stays a full sort of the vocabulary
    cand = jax.lax.optimization_barrier(jax.lax.top_k(x, m)[0])  # [..., m]
    # top-k survivors: x >= kth (-inf when off: the whole vocabulary)
    k = jnp.clip(top_k, 1, m)
    if k.ndim == 0:
        kth = jax.lax.dynamic_slice_in_dim(cand, k - 1, 1, axis=-1)
    else:  # per row: [B, 1, .., 1] -> [..., 1]
        kth = jnp.take_along_axis(cand, jnp.broadcast_to(k - 1, cand.shape[:-1] + (1,)), -1)
    kth = jnp.where(top_k > 0, kth, -jnp.inf)
    # top-p over the survivors, normalised over all of them (also any past the m largest)
    top = cand[..., :1]
    mass = jnp.sum(jnp.where(x >= kth, jnp.exp(x - top), 0.0), axis=-1, keepdims=True)
    survivor = cand >= kth
    cand_p = jnp.where(survivor, jnp.exp(cand - top), 0.0) / mass
    before = jnp.cumsum(cand_p, axis=-1) - cand_p  # mass strictly before each candidate
    # top_p = 1 keeps everything: in float32 ``before`` can round up to 1 for tokens of
    # probability below ~1e-7, which ``before < 1`` alone would drop
    keep = ((before < top_p) | (top_p >= 1.0)) & survivor
    cutoff = jnp.min(jnp.where(keep, cand, jnp.inf), axis=-1, keepdims=True)
    return jax.nn.log_softmax(jnp.where(x >= cutoff, x, _NEG), axis=-1)


def sample(key: jax.Array, log_probs: jax.Array) -> jax.Array:
    """One token id per leading index of ``log_probs [..., V]``."""
    return jax.random.categorical(key, log_probs, axis=-1).astype(jnp.int32)


def argmax(logits: jax.Array) -> jax.Array:
    """``jnp.argmax(logits, axis=-1)`` as int32 ``[...]``, for ``logits [..., V]``: the first
    index of the largest value (of the first NaN, if any).

    Computed as a maximum, then the least index holding it: two plain reductions that XLA
    vectorises, where its fused index-and-value reduction of ``jnp.argmax`` is not (on CPU,
    ``[16, 8192]`` float32: ~0.1 ms against ~0.3 ms).
    """
    top = jnp.max(logits, axis=-1, keepdims=True)  # NaN if any entry is NaN
    hit = (logits == top) | jnp.isnan(logits)
    index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(hit, index, logits.shape[-1]), axis=-1)


def greedy_accept(drafts: jax.Array, verify_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Greedy acceptance. ``drafts [B, K-1]``; ``verify_logits [B, K, V]`` where position
    ``i`` predicts the token after draft ``i`` (``i = 0``: after the anchor).

    Returns ``(j [B], next_anchor [B])``: ``j`` = longest prefix with
    ``drafts[i] == argmax p_i``; the next anchor is ``argmax p_j``.
    """
    target = argmax(verify_logits)  # [B, K]
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
