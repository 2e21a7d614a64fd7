"""Attention math as pure functions (grouped-query, scores and softmax in float32).

Head layout follows HF ``repeat_kv``: query head ``h`` reads KV head ``h // (Hq/Hkv)``.

Cached K/V are ``[B, Hkv, S, hd]`` (:mod:`orthrus_jax.cache`) and enter the products as
``[B * Hkv, S, hd]``, the same buffer: one batch axis, each KV head's positions
contiguous, the contraction axis last, so XLA feeds them to its matrix products as they
are. The queries of a KV head's ``G = Hq / Hkv`` query heads are gathered into rows of one
product, ``[B * Hkv, G * T, hd]``; they are the small operand.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from orthrus_jax.cpu_attention import prefix_partials

_NEG = -1e30


def _group_queries(q: jax.Array, hkv: int) -> jax.Array:
    """``q [B, *lead, T, Hq, hd]`` -> ``[B * Hkv, *lead, G * T, hd]``, rows ``g * T + t``."""
    B, *lead, T, Hq, hd = q.shape
    n = len(lead)
    qg = q.reshape(B, *lead, T, hkv, Hq // hkv, hd)
    # [B, Hkv, *lead, G, T, hd]
    perm = (0, n + 2, *range(1, n + 1), n + 3, n + 1, n + 4)
    return qg.transpose(perm).reshape(B * hkv, *lead, (Hq // hkv) * T, hd)


def _ungroup(o: jax.Array, B: int, hkv: int, T: int) -> jax.Array:
    """Inverse of :func:`_group_queries`: ``[B * Hkv, *lead, G * T, hd]`` ->
    ``[B, *lead, T, Hq, hd]``."""
    _, *lead, GT, hd = o.shape
    n = len(lead)
    G = GT // T
    o = o.reshape(B, hkv, *lead, G, T, hd)
    # [B, *lead, T, Hkv, G, hd]
    perm = (0, *range(2, n + 2), n + 3, 1, n + 2, n + 4)
    return o.transpose(perm).reshape(B, *lead, T, hkv * G, hd)


def _per_row(mask: jax.Array, hkv: int, G: int) -> jax.Array:
    """A mask ``[B, *lead, T, S]`` shared by a row's heads -> ``[B * Hkv, *lead, G * T, S]``
    (rows as in :func:`_group_queries`)."""
    B, *lead, T, S = mask.shape
    m = jnp.broadcast_to(mask[:, None, ..., None, :, :], (B, hkv, *lead, G, T, S))
    return m.reshape(B * hkv, *lead, G * T, S)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked softmax attention.

    q ``[B, T, Hq, hd]``; k, v ``[B, Hkv, S, hd]``; mask ``[B, T, S]`` (True = visible;
    every query must see at least one key). Returns ``[B, T, Hq, hd]`` in ``q.dtype``.
    """
    B, T, Hq, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    dt = q.dtype
    qg = _group_queries(q, Hkv)  # [N, G*T, hd]
    kf = k.reshape(B * Hkv, S, hd).astype(dt)
    vf = v.reshape(B * Hkv, S, hd).astype(dt)
    scores = jnp.einsum("nqd,nsd->nqs", qg, kf, preferred_element_type=jnp.float32) * hd**-0.5
    scores = jnp.where(_per_row(mask, Hkv, Hq // Hkv), scores, _NEG)
    probs = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    denom = jnp.sum(probs, axis=-1, keepdims=True)
    out = jnp.einsum("nqs,nsd->nqd", probs.astype(dt), vf, preferred_element_type=jnp.float32)
    return _ungroup((out / denom).astype(dt), B, Hkv, T)


def _row_limits(limits: jax.Array, hkv: int, G: int) -> jax.Array:
    """Keys visible to each query ``[B, *lead, T]`` -> per row of :func:`_group_queries`,
    ``[B * Hkv, *lead, G * T]`` (:func:`_per_row` of a one-key mask)."""
    return _per_row(limits[..., None], hkv, G)[..., 0]


def causal_cache_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                           q_positions: jax.Array, kernel: bool = False) -> jax.Array:
    """AR view: queries at ``q_positions [B, T]`` attend to cache positions ``<=`` their own.

    ``k_cache``/``v_cache`` ``[B', Hkv, S, hd]`` (``B' >= B``; rows past ``B`` are not
    read) already hold the chunk's own K/V. ``kernel``: through
    :func:`orthrus_jax.cpu_attention.prefix_partials`, which reads only the visible keys.
    """
    if kernel:
        B, T, Hq, hd = q.shape
        Hkv, S = k_cache.shape[1], k_cache.shape[2]
        o, _, total = prefix_partials(_group_queries(q, Hkv), k_cache.reshape(-1, S, hd),
                                      v_cache.reshape(-1, S, hd),
                                      _row_limits(q_positions + 1, Hkv, Hq // Hkv), hd**-0.5)
        return _ungroup((o / total[..., None]).astype(q.dtype), B, Hkv, T)
    k_cache, v_cache = k_cache[:q.shape[0]], v_cache[:q.shape[0]]
    key_pos = jnp.arange(k_cache.shape[2])
    mask = key_pos[None, None, :] <= q_positions[:, :, None]
    return attend(q, k_cache, v_cache, mask)


def block_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                    k_block: jax.Array, v_block: jax.Array,
                    prefix_lengths: jax.Array, block_mask: jax.Array | None = None,
                    kernel: bool = False) -> jax.Array:
    """Block ``b`` of row ``r`` attends to AR cache positions ``[0, prefix_lengths[r, b])``
    and to the positions of its own block that ``block_mask [B, m, K, K]`` shows (True =
    visible; default: all of them, the diffusion view), nothing else. A tree's verify pass
    is one block whose mask shows each row its ancestors.

    q, k_block, v_block ``[B, m, K, H, hd]`` (``m`` blocks of ``K`` tokens per row);
    k_cache, v_cache ``[B, Hkv, S, hd]``; prefix_lengths ``[B, m]``. The two key sets are
    scored separately and normalised together (one running maximum, one sum of both
    parts' exponentials), so neither a dense ``[m K, S + m K]`` mask nor a concatenation
    of the two score arrays is built; memory is ``O(m K (S + K))`` per head. Returns
    ``[B, m, K, Hq, hd]``. The cache may hold more rows than ``B`` (not read);
    ``kernel``: the prefix part through
    :func:`orthrus_jax.cpu_attention.prefix_partials`, which reads only the visible keys.
    """
    B, m, K, Hq, hd = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    G, N = Hq // Hkv, B * Hkv
    dt = q.dtype
    qg = _group_queries(q, Hkv)  # [N, m, G*K, hd]
    kb = k_block.transpose(0, 3, 1, 2, 4).reshape(N, m, K, hd).astype(dt)
    vb = v_block.transpose(0, 3, 1, 2, 4).reshape(N, m, K, hd).astype(dt)
    s_block = jnp.einsum("nmqd,nmtd->nmqt", qg, kb,
                         preferred_element_type=jnp.float32) * hd**-0.5
    if block_mask is not None:
        s_block = jnp.where(_per_row(block_mask, Hkv, G), s_block, _NEG)
    if kernel:  # the prefix's partials, normalised together with the block's scores
        limit = _row_limits(jnp.broadcast_to(prefix_lengths[:, :, None], (B, m, K)), Hkv, G)
        o, m_p, l_p = prefix_partials(qg.reshape(N, m * G * K, hd),
                                      k_cache.reshape(-1, S, hd), v_cache.reshape(-1, S, hd),
                                      limit.reshape(N, m * G * K), hd**-0.5)
        m_p, l_p = m_p.reshape(N, m, G * K, 1), l_p.reshape(N, m, G * K, 1)
        top = jnp.maximum(m_p, jnp.max(s_block, axis=-1, keepdims=True))
        shift = jnp.exp(m_p - top)
        p_block = jnp.exp(s_block - top)
        denom = l_p * shift + jnp.sum(p_block, axis=-1, keepdims=True)
        out = (o.reshape(N, m, G * K, hd) * shift
               + jnp.einsum("nmqt,nmtd->nmqd", p_block.astype(dt), vb,
                            preferred_element_type=jnp.float32))
        return _ungroup((out / denom).astype(dt), B, Hkv, K)
    k_cache, v_cache = k_cache[:B], v_cache[:B]
    kf = k_cache.reshape(N, S, hd).astype(dt)
    vf = v_cache.reshape(N, S, hd).astype(dt)
    s_prefix = jnp.einsum("nqd,nsd->nqs", qg.reshape(N, m * G * K, hd), kf,
                          preferred_element_type=jnp.float32).reshape(N, m, G * K, S)
    visible = jnp.arange(S)[None, None, :] < prefix_lengths[:, :, None]  # [B, m, S]
    visible = _per_row(jnp.broadcast_to(visible[:, :, None], (B, m, K, S)), Hkv, G)
    s_prefix = jnp.where(visible, s_prefix * hd**-0.5, _NEG)
    top = jnp.maximum(jnp.max(s_prefix, axis=-1, keepdims=True),
                      jnp.max(s_block, axis=-1, keepdims=True))
    p_prefix = jnp.exp(s_prefix - top)
    p_block = jnp.exp(s_block - top)
    denom = jnp.sum(p_prefix, axis=-1, keepdims=True) + jnp.sum(p_block, axis=-1, keepdims=True)
    out = (jnp.einsum("nqs,nsd->nqd", p_prefix.reshape(N, m * G * K, S).astype(dt), vf,
                      preferred_element_type=jnp.float32).reshape(N, m, G * K, hd)
           + jnp.einsum("nmqt,nmtd->nmqd", p_block.astype(dt), vb,
                        preferred_element_type=jnp.float32))
    return _ungroup((out / denom).astype(dt), B, Hkv, K)


def over_window(attention: Callable[[jax.Array, jax.Array], jax.Array], k_cache: jax.Array,
                v_cache: jax.Array, windows: tuple[int, ...], need: jax.Array,
                rows: int | jax.Array | None = None, slice_rows: bool = True) -> jax.Array:
    """``attention(k, v)`` over the first ``rows`` rows (default: all; an int32 array
    ``[R]``: those rows, in that order) and the first ``W`` positions of
    ``k_cache``/``v_cache`` ``[B, Hkv, S, hd]``, ``W`` the smallest of the static
    ``windows`` with ``W >= need`` (a traced scalar: the positions any query may see),
    else all ``S``.

    One ``lax.switch`` with a branch per window (each a static slice, so each branch's
    products have static shapes): the cost follows the live length in steps of the
    windows, in one compiled program. ``attention`` must give the same result over any
    prefix that holds every position its queries see (a mask from positions does).
    ``slice_rows=False`` hands ``attention`` all rows (it reads the first ``rows`` itself).
    Rows given as an array are read as one gather of their windows (nothing else moves).
    """
    B, H, S, hd = k_cache.shape
    widths = (*(w for w in windows if w < S), S)  # one branch each, the whole cache last
    if rows is not None and not isinstance(rows, int):
        def gathered(w: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
            def take(a: jax.Array) -> jax.Array:
                return jax.vmap(lambda r: jax.lax.dynamic_slice(
                    a, (r, 0, 0, 0), (1, H, w, hd))[0])(rows)
            return lambda k, v: attention(take(k), take(v))
        branches = [gathered(w) for w in widths]
    else:
        R = B if rows is None or not slice_rows else rows

        def over(w: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
            if w == S and R == B:
                return attention
            return lambda k, v: attention(k[:R, :, :w], v[:R, :, :w])
        branches = [over(w) for w in widths]
    if len(branches) == 1:
        return branches[0](k_cache, v_cache)
    index = jnp.sum((jnp.asarray(widths[:-1]) < need).astype(jnp.int32))
    return jax.lax.switch(index, branches, k_cache, v_cache)
