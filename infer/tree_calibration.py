"""A head's tree scoring, fitted: how often a drafted candidate is the AR model's token.

A draft tree spends its nodes on the paths most likely to be accepted. The diffusion view's
probabilities rank the candidates of one position well but are not the rates at which the
AR model agrees with them: on the shipped SmolLM2 head a candidate of probability 0.5 at
depth 1 is the AR model's token more often than one of probability 0.5 at depth 3, and
the ratio between candidates of two depths is what a product of marginals gets wrong. The
fitted table (:class:`infer.tree.TreeScoring`) replaces each candidate's log-probability
by the log of the rate at which candidates of its depth and log-probability bin were the
AR model's token, measured here:

- For every position of greedy continuations (the AR model's own tokens, which a lossless
  verifier accepts), :func:`candidates` runs the diffusion pass from that anchor (the
  draft an iteration anchored there would see) and keeps its ``top`` candidates per depth.
- :func:`fit` counts, per depth and bin, the candidates a tree could reach (the true
  tokens of every shallower depth were among that depth's candidates) and those that were
  the true token; their smoothed ratio, made non-decreasing along the bins, is the table.

``python -m infer.calibrate`` fits it on the calibration prompts and stores it in the
acceptance profile; decoding then builds every tree with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from infer.buckets import bucket
from infer.tree import SCORE_BINS, SCORE_EDGES, TOP_CANDIDATES
from orthrus_jax.cache import init_cache
from orthrus_jax.model import OrthrusLM, prefill

# Anchors drafted per diffusion call (a fixed shape: one compile per sequence bucket).
ANCHOR_CHUNK = 64
# Pseudo-count of every (depth, bin): one reachable candidate that hits at the rate its
# draft probability says (the bin's middle log-probability), so that a bin seen rarely
# scores about as the plain product would.
PRIOR_WEIGHT = 1.0


def bin_log_probs() -> np.ndarray:
    """``[SCORE_BINS]`` a middle log-probability of each bin (the first: one below its
    edge; the last: halfway to 0)."""
    e = np.asarray(SCORE_EDGES)
    return np.concatenate([[e[0] - 1.0], (e[:-1] + e[1:]) / 2, [e[-1] / 2]])


def candidates(model: OrthrusLM, prompt_ids: Sequence[int], output_ids: Sequence[int],
               block: int, top: int = TOP_CANDIDATES
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The diffusion view's ``top`` candidates at each of the ``D = block - 1`` depths after
    every anchor of ``output_ids`` (the tokens a greedy decode of ``prompt_ids`` produced;
    anchors are those with at least one token after them).

    Returns ``log_probs [T, D, top]`` and ``ids [T, D, top]`` (descending per depth) and
    ``true [T, D]``: the token that followed at each depth (-1 past the output's end)."""
    if block < 2:
        raise ValueError(f"block {block}: a tree drafts at least one position (block >= 2)")
    seq = np.asarray(list(prompt_ids) + list(output_ids), np.int32)
    n, T = len(prompt_ids), len(output_ids) - 1
    D = block - 1
    if n < 1 or T < 1:
        return (np.zeros((0, D, top), np.float32), np.zeros((0, D, top), np.int32),
                np.zeros((0, D), np.int64))
    S = bucket(len(seq))
    padded = np.zeros((1, S), np.int32)
    padded[0, :len(seq)] = seq
    cache = _prefilled(model, jnp.asarray(padded), jnp.asarray([len(seq)], jnp.int32))
    anchors = np.arange(n, n + T)
    lps, idss = [], []
    for lo in range(0, T, ANCHOR_CHUNK):
        pos = np.full((1, ANCHOR_CHUNK), n, np.int32)  # filler anchors: dropped below
        chunk = anchors[lo:lo + ANCHOR_CHUNK]
        pos[0, :len(chunk)] = chunk
        lp, ids = _draft_top(model, cache, jnp.asarray(seq[pos]), jnp.asarray(pos), D, top)
        lps.append(np.asarray(lp[0, :len(chunk)]))
        idss.append(np.asarray(ids[0, :len(chunk)]))
    true = np.full((T, D), -1, np.int64)
    for d in range(D):
        at = anchors + 1 + d
        ok = at < len(seq)
        true[ok, d] = seq[at[ok]]
    return np.concatenate(lps), np.concatenate(idss), true


@jax.jit
def _prefilled(model: OrthrusLM, tokens: jax.Array, lengths: jax.Array):
    cache = init_cache(model.config, tokens.shape[0], tokens.shape[1],
                       per_layer=model.per_layer)
    return prefill(model, tokens, cache, lengths)[1]


@partial(jax.jit, static_argnums=(4, 5))
def _draft_top(model: OrthrusLM, cache, anchor_tokens: jax.Array, anchor_pos: jax.Array,
               depth: int, top: int) -> tuple[jax.Array, jax.Array]:
    """``[1, A]`` anchors -> the top candidates ``[1, A, depth, top]`` of their drafts."""
    B, A = anchor_tokens.shape
    masks = jnp.full((B, A, depth), model.config.mask_token_id, jnp.int32)
    blocks = jnp.concatenate([anchor_tokens[..., None], masks], axis=-1)
    hidden = model.diffusion_blocks(blocks, anchor_pos, cache)[:, :, :-1]
    return jax.lax.top_k(jax.nn.log_softmax(model.logits(hidden), axis=-1), top)


def fit(log_probs: np.ndarray, ids: np.ndarray, true: np.ndarray,
        prior_weight: float = PRIOR_WEIGHT) -> np.ndarray:
    """The table ``[D, SCORE_BINS]`` of :class:`infer.tree.TreeScoring` from
    :func:`candidates`' arrays (concatenated over sequences): per depth and log-probability
    bin, the log of ``(hits + w p) / (reachable + w)`` (``w = prior_weight``, ``p`` the
    bin's middle probability, :func:`bin_log_probs`), then made non-decreasing along the
    bins (a running maximum). A depth's candidates are reachable when the true tokens of
    all shallower depths were among their depths' candidates, and one is a hit when it is
    the true token."""
    log_probs, ids, true = np.asarray(log_probs), np.asarray(ids), np.asarray(true)
    if log_probs.shape != ids.shape or log_probs.shape[:2] != true.shape:
        raise ValueError(f"log_probs {log_probs.shape}, ids {ids.shape} and true {true.shape} "
                         "must be [T, D, top], [T, D, top] and [T, D]")
    T, D, _ = log_probs.shape
    hits = np.tile(prior_weight * np.exp(bin_log_probs()), (D, 1))
    total = np.full((D, SCORE_BINS), float(prior_weight))
    bins = np.searchsorted(np.asarray(SCORE_EDGES), log_probs, side="right")  # [T, D, top]
    hit = ids == true[..., None]  # [T, D, top]
    reach = np.ones((T,), bool)
    for d in range(D):
        reach &= true[:, d] >= 0
        np.add.at(total[d], bins[reach, d].ravel(), 1)
        np.add.at(hits[d], bins[reach, d][hit[reach, d]], 1)
        reach &= hit[:, d].any(axis=-1)
    return np.maximum.accumulate(np.log(hits / total), axis=1)


def measure(model: OrthrusLM, sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
            block: int) -> np.ndarray:
    """:func:`fit` over the ``(prompt_ids, output_ids)`` greedy decodes of ``sequences``."""
    parts = [candidates(model, p, o, block) for p, o in sequences]
    if not any(len(t) for _, _, t in parts):
        raise ValueError("no output of two or more tokens to fit a tree scoring on")
    return fit(*(np.concatenate([part[i] for part in parts]) for i in range(3)))
