"""Attention math as pure functions (grouped-query, scores and softmax in float32).

Head layout follows HF ``repeat_kv``: query head ``h`` reads KV head ``h // (Hq/Hkv)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e30


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked softmax attention.

    q ``[B, T, Hq, hd]``; k, v ``[B, S, Hkv, hd]``; mask ``[B, T, S]`` (True = visible).
    Returns ``[B, T, Hq, hd]`` in ``q.dtype``.
    """
    B, T, Hq, hd = q.shape
    Hkv = k.shape[2]
    qg = q.reshape(B, T, Hkv, Hq // Hkv, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(q.dtype),
                        preferred_element_type=jnp.float32) * hd**-0.5
    scores = jnp.where(mask[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(q.dtype))
    return out.reshape(B, T, Hq, hd)


def causal_cache_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                           q_positions: jax.Array) -> jax.Array:
    """AR view: queries at ``q_positions [B, T]`` attend to cache positions ``<=`` their own.

    ``k_cache``/``v_cache`` ``[B, S, Hkv, hd]`` already hold the chunk's own K/V.
    """
    key_pos = jnp.arange(k_cache.shape[1])
    mask = key_pos[None, None, :] <= q_positions[:, :, None]
    return attend(q, k_cache, v_cache, mask)


def block_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                    k_block: jax.Array, v_block: jax.Array,
                    prefix_lengths: jax.Array) -> jax.Array:
    """Diffusion view: block ``b`` of row ``r`` attends to AR cache positions
    ``[0, prefix_lengths[r, b])`` and to every position of its own block (no causal mask
    inside the block), nothing else.

    q, k_block, v_block ``[B, m, K, H, hd]`` (``m`` blocks of ``K`` tokens per row);
    k_cache, v_cache ``[B, S, Hkv, hd]``; prefix_lengths ``[B, m]``. The two key sets are
    scored separately and normalised by one softmax over their concatenation, so memory is
    ``O(m K (S + K))`` per head, with no dense ``[m K, S + m K]`` mask. Returns
    ``[B, m, K, Hq, hd]``.
    """
    B, m, K, Hq, hd = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    qg = q.reshape(B, m, K, Hkv, Hq // Hkv, hd)
    dt = q.dtype
    s_prefix = jnp.einsum("bmqkgd,bskd->bmkgqs", qg, k_cache.astype(dt),
                          preferred_element_type=jnp.float32)
    visible = jnp.arange(S)[None, None, :] < prefix_lengths[:, :, None]  # [B, m, S]
    s_prefix = jnp.where(visible[:, :, None, None, None, :], s_prefix, _NEG)
    s_block = jnp.einsum("bmqkgd,bmtkd->bmkgqt", qg, k_block.astype(dt),
                         preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(jnp.concatenate([s_prefix, s_block], -1) * hd**-0.5, axis=-1)
    probs = probs.astype(dt)
    out = (jnp.einsum("bmkgqs,bskd->bmqkgd", probs[..., :S], v_cache.astype(dt))
           + jnp.einsum("bmkgqt,bmtkd->bmqkgd", probs[..., S:], v_block.astype(dt)))
    return out.reshape(B, m, K, Hq, hd)
