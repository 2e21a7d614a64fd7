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
    """Diffusion view: block queries attend to cache positions ``[0, prefix_lengths[b])``
    and to every position of their own block (no causal mask inside the block).

    q, k_block, v_block ``[B, K, H, hd]``; k_cache, v_cache ``[B, S, Hkv, hd]``.
    """
    B, K = q.shape[:2]
    key_pos = jnp.arange(k_cache.shape[1])
    cache_mask = key_pos[None, :] < prefix_lengths[:, None]  # [B, S]
    mask = jnp.concatenate([cache_mask, jnp.ones((B, K), bool)], axis=1)
    mask = jnp.broadcast_to(mask[:, None, :], (B, K, mask.shape[-1]))
    k = jnp.concatenate([k_cache.astype(k_block.dtype), k_block], axis=1)
    v = jnp.concatenate([v_cache.astype(v_block.dtype), v_block], axis=1)
    return attend(q, k, v, mask)
