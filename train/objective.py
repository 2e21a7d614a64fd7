"""The training objective of the diffusion view (published Orthrus recipe).

For each packed sequence: one AR pass of the frozen model (no gradient) gives every layer's
K/V and the teacher distribution at every position; one diffusion pass over all anchor
blocks ``[x_a, MASK x (K-1)]`` (each sees the AR K/V before its anchor and its own block)
gives the drafts; the loss is ``KL(p_{a+i} || q_i)`` over the ``K - 1`` drafted positions
(or cross-entropy on the data token). Logits and loss are computed a few blocks at a time
under ``jax.checkpoint``, so no ``[m K, V]`` array is ever held.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from orthrus_jax.cache import init_cache
from orthrus_jax.model import OrthrusLM

LOSSES = ("kl", "ce")


def teacher_pass(model: OrthrusLM, tokens: jax.Array):
    """Frozen AR pass over ``tokens [B, L]``: final hidden ``[B, L, D]`` and the cache
    holding every layer's K/V, both without gradient."""
    B, L = tokens.shape
    hidden, cache = model.ar_hidden(tokens, init_cache(model.config, B, L))
    return jax.lax.stop_gradient(hidden), jax.tree.map(jax.lax.stop_gradient, cache)


def anchor_blocks(tokens: jax.Array, anchors: jax.Array, block_size: int,
                  mask_token_id: int) -> jax.Array:
    """``[B, m, K]`` blocks ``[x_a, MASK, ..., MASK]`` for ``anchors [B, m]``."""
    B, m = anchors.shape
    first = jnp.take_along_axis(tokens, anchors, axis=1)
    rest = jnp.full((B, m, block_size - 1), mask_token_id, tokens.dtype)
    return jnp.concatenate([first[:, :, None], rest], axis=2)


def training_loss(model: OrthrusLM, tokens: jax.Array, anchors: jax.Array,
                  anchor_mask: jax.Array, *, loss: str = "kl", loss_chunk: int = 16,
                  remat: bool = False) -> tuple[jax.Array, dict]:
    """Summed loss over the drafted positions of the valid anchor blocks.

    ``tokens [B, L]``; ``anchors [B, m]`` with ``1 <= a <= L - K``; ``anchor_mask [B, m]``
    marks real anchors. ``loss_chunk`` blocks go through the LM head at a time. Returns
    ``(total, metrics)``: the sum over positions (divide by ``metrics["positions"]`` for
    the mean; sums let micro-batches and devices combine exactly) and
    ``{"loss_sum", "hits", "positions"}`` (hits: drafted positions whose argmax equals
    the teacher's argmax).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r}: choose one of {LOSSES}")
    c = model.config
    K = c.block_size
    B, m = anchors.shape
    anchors = anchors.astype(jnp.int32)
    teacher_hidden, cache = teacher_pass(model, tokens)
    blocks = anchor_blocks(tokens, anchors, K, c.mask_token_id)
    draft_hidden = model.diffusion_blocks(blocks, anchors, cache, remat=remat)[:, :, :-1]

    # Position a + i predicts token a + i + 1: teacher hidden and data targets per draft.
    pos = anchors[:, :, None] + jnp.arange(K - 1, dtype=jnp.int32)  # [B, m, K-1]
    flat = pos.reshape(B, m * (K - 1))
    teacher = jnp.take_along_axis(teacher_hidden, flat[:, :, None], axis=1)
    teacher = teacher.reshape(B, m, K - 1, -1)
    targets = jnp.take_along_axis(tokens, jnp.minimum(flat + 1, tokens.shape[1] - 1), axis=1)
    targets = targets.reshape(B, m, K - 1)

    chunk = min(loss_chunk, m)
    n_chunks = -(-m // chunk)
    pad = n_chunks * chunk - m

    def to_chunks(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(B, n_chunks, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk_terms(d_h, t_h, tgt, ok):
        logq = jax.nn.log_softmax(model.logits(d_h), axis=-1)  # [B, c, K-1, V]
        t_logits = jax.lax.stop_gradient(model.logits(t_h))
        if loss == "kl":
            logp = jax.nn.log_softmax(t_logits, axis=-1)
            per = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
        else:
            per = -jnp.take_along_axis(logq, tgt[..., None], axis=-1)[..., 0]
        hit = jnp.argmax(logq, -1) == jnp.argmax(t_logits, -1)
        w = ok[:, :, None].astype(jnp.float32)
        return jnp.sum(per * w), jnp.sum(hit * w)

    def body(acc, xs):
        total, hits = chunk_terms(*xs)
        return (acc[0] + total, acc[1] + hits), None

    (total, hits), _ = jax.lax.scan(
        body, (jnp.float32(0), jnp.float32(0)),
        (to_chunks(draft_hidden), to_chunks(teacher), to_chunks(targets),
         to_chunks(anchor_mask.astype(bool))))
    positions = jnp.sum(anchor_mask.astype(jnp.float32)) * (K - 1)
    return total, {"loss_sum": total, "hits": hits, "positions": positions}
