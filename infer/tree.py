"""Draft trees: more accepted tokens per verify pass (docs/decoding.md, "Tree verification").

One diffusion pass drafts a distribution for each of the next ``D = K - 1`` positions. A
chain verifies only the most likely token of each; a tree of ``N`` drafted nodes verifies
the ``N`` most likely *paths*: a path picks one of the ``TOP_CANDIDATES`` most likely
tokens at each depth ``1 .. d`` and scores the sum of its nodes' scores. A node's score is
its log-probability (the path then scores the product of the diffusion view's marginals),
or with a :class:`TreeScoring` fitted to a head (:mod:`infer.tree_calibration`) the log of
how often a candidate of that depth and log-probability was the AR model's token. Built
best-first, a node's parent always comes before it, so the nodes of every prefix-closed set
are found in score order.

The verify pass runs the AR view over ``N + 1`` rows: row 0 is the anchor, row ``i`` is
node ``i - 1``. Row ``r`` sits at position ``length + depth(r)`` and sees the committed
cache and its own ancestors (``Tree.visible``). Acceptance walks down from the anchor
while the token the AR view chose at the current row is one of its children
(:func:`walk`): siblings hold different tokens, so at most one child matches and the
accepted rows form one path.

Everything here is pure and per row: ``[B, ...]`` arrays, static ``N`` and ``D``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from infer.buckets import MAX_TREE_BUDGET

# Candidate tokens per depth that a tree may branch into (the most likely of each
# position's distribution). A budget of at most this many nodes can use them all.
TOP_CANDIDATES = 16
_NEG = -1e30
# The log-probability bins of a TreeScoring table: bin ``i`` holds log-probabilities in
# ``[SCORE_EDGES[i - 1], SCORE_EDGES[i])`` (bin 0 everything below -8, the last bin
# everything from -0.03 up).
SCORE_EDGES = (-8.0, -6.0, -5.0, -4.0, -3.0, -2.5, -2.0, -1.5, -1.0, -0.7, -0.4, -0.2,
               -0.1, -0.03)
SCORE_BINS = len(SCORE_EDGES) + 1
# The weight of the log-probability itself in a calibrated score: it orders candidates of
# one bin (their table entries are equal) and changes nothing else.
CALIBRATED_WEIGHT = 1e-3


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TreeScoring:
    """How a draft tree scores a candidate token: ``table[d, bin(lp)] + weight * lp``
    for a candidate of log-probability ``lp`` at depth ``d + 1`` (depths past the table's
    last row use that row).

    ``table [D, SCORE_BINS]`` must be non-positive (a path never scores above its
    prefixes) and non-decreasing along the bins (a more likely token never scores lower);
    ``weight []`` must be positive. :meth:`product` (zeros, 1) scores the log-probability
    itself; a calibrated table holds the log hit rate of each depth and bin, with
    ``weight`` :data:`CALIBRATED_WEIGHT`."""

    table: jax.Array
    weight: jax.Array

    @classmethod
    def product(cls, depth: int) -> TreeScoring:
        """The plain product-of-marginals scoring, ``[depth, SCORE_BINS]`` zeros, weight 1."""
        return cls(jnp.zeros((depth, SCORE_BINS), jnp.float32), jnp.float32(1.0))

    @classmethod
    def calibrated(cls, log_hit_rate, depth: int) -> TreeScoring:
        """A fitted ``log_hit_rate [D', SCORE_BINS]`` as a table of ``depth`` rows (cut, or
        its last row repeated), weight :data:`CALIBRATED_WEIGHT`."""
        t = jnp.asarray(log_hit_rate, jnp.float32)
        t = t[jnp.minimum(jnp.arange(depth), t.shape[0] - 1)]
        return cls(t, jnp.float32(CALIBRATED_WEIGHT))

    def score(self, lp: jax.Array) -> jax.Array:
        """``lp [..., D, c]`` (depth ``d + 1`` at index ``d``) -> the candidates' scores."""
        bins = jnp.searchsorted(jnp.asarray(SCORE_EDGES, lp.dtype), lp, side="right")
        rows = jnp.minimum(jnp.arange(lp.shape[-2]), self.table.shape[0] - 1)
        return self.table[rows[:, None], bins] + self.weight * lp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Tree:
    """``B`` rows of ``N`` drafted nodes each; node ``i`` is verify row ``i + 1``.

    ``tokens [B, N]``: each node's token. ``parents [B, N]``: the verify row of its parent
    (0 = the anchor). ``depths [B, N]``: 1 .. D (its position after the anchor).
    ``valid [B, N]``: False for the nodes of a budget larger than the candidates allow
    (they are verified but never accepted). ``visible [B, N + 1, N + 1]``: verify row
    ``r`` sees row ``s`` (``s`` is ``r`` or an ancestor of ``r``).
    """

    tokens: jax.Array
    parents: jax.Array
    depths: jax.Array
    valid: jax.Array
    visible: jax.Array

    def rows(self, anchor: jax.Array) -> jax.Array:
        """The verify pass's tokens ``[B, N + 1]``: the anchor ``[B]``, then the nodes."""
        return jnp.concatenate([anchor[:, None], self.tokens], axis=1)

    @property
    def offsets(self) -> jax.Array:
        """``[B, N + 1]`` each verify row's position after the row's cache length (its depth;
        0 for the anchor)."""
        return jnp.concatenate([jnp.zeros_like(self.depths[:, :1]), self.depths], axis=1)


def build(log_probs: jax.Array, budget: int, top: int = TOP_CANDIDATES,
          scoring: TreeScoring | None = None) -> Tree:
    """The best-first tree of ``budget`` nodes from per-depth ``log_probs [B, D, V]``
    (depth ``d`` at index ``d - 1``).

    A path's score is the sum of its tokens' scores (their log-probabilities, or
    ``scoring``'s score of them, :class:`TreeScoring`), among the ``top`` most likely
    tokens of each depth; the tree holds the ``budget`` best paths whose every prefix is
    also held (each prefix scores at least as well, so that is the best ``budget`` paths,
    ties broken by discovery order).
    Enumerated as a k-best search: popping a node offers its first child (the best token
    one depth further) and its next sibling (the next token at its own depth under the
    same parent); the frontier holds at most ``2 budget + 1`` entries, so a tree costs
    ``O(budget^2)`` small operations per row.
    """
    if not 1 <= budget <= MAX_TREE_BUDGET:
        raise ValueError(f"tree budget {budget} must be in [1, {MAX_TREE_BUDGET}]")
    c = min(top, budget, log_probs.shape[-1])
    # The barrier keeps XLA (CPU) from folding the indexing below into top_k's sort + slice
    # form, a full sort of the vocabulary (150 ms at SmolLM2's, against 1 ms).
    lp, ids = jax.lax.top_k(jnp.maximum(log_probs.astype(jnp.float32), -1e4), c)  # [B, D, c]
    lp, ids = jax.lax.optimization_barrier(lp), jax.lax.optimization_barrier(ids)
    if scoring is not None:
        lp = scoring.score(lp)  # still descending per depth: the table is monotone
    return jax.vmap(lambda a, b: _build_row(a, b, budget))(lp, ids.astype(jnp.int32))


def _build_row(lp: jax.Array, ids: jax.Array, budget: int) -> Tree:
    """:func:`build` for one row: ``lp`` (the scores), ``ids`` ``[D, c]`` (descending
    per depth)."""
    D, c = lp.shape
    P = 2 * budget + 1  # frontier slots: one to start, at most two offered per pop
    N = budget
    score = jnp.full((P,), _NEG).at[0].set(lp[0, 0])
    depth = jnp.ones((P,), jnp.int32)
    rank = jnp.zeros((P,), jnp.int32)
    parent = jnp.zeros((P,), jnp.int32)
    out = (jnp.zeros((N,), jnp.int32), jnp.zeros((N,), jnp.int32), jnp.ones((N,), jnp.int32),
           jnp.zeros((N,), bool), jnp.eye(N + 1, dtype=bool))

    def body(i, carry):
        (score, depth, rank, parent, used), (tok, par, dep, val, vis) = carry
        b = jnp.argmax(score)
        s, d, r, p = score[b], depth[b], rank[b], parent[b]
        ok = s > _NEG / 2
        row = i + 1
        tok = tok.at[i].set(jnp.where(ok, ids[d - 1, r], 0))
        par = par.at[i].set(jnp.where(ok, p, 0))
        dep = dep.at[i].set(jnp.where(ok, d, 1))
        val = val.at[i].set(ok)
        p_seen = jnp.where(ok, p, row)  # an invalid node sees only itself
        vis = vis.at[row].set(vis[p_seen] | (jnp.arange(N + 1) == row))
        score = score.at[b].set(_NEG)
        # first child: the best token one depth further, under this node
        child_ok = ok & (d < D)
        child = jnp.where(child_ok, s + lp[jnp.minimum(d, D - 1), 0], _NEG)
        score, depth, rank, parent = (
            score.at[used].set(child), depth.at[used].set(d + 1), rank.at[used].set(0),
            parent.at[used].set(row))
        # next sibling: the next token at this depth, under the same parent
        sib_ok = ok & (r + 1 < c)
        sib = jnp.where(sib_ok, s - lp[d - 1, r] + lp[d - 1, jnp.minimum(r + 1, c - 1)], _NEG)
        score, depth, rank, parent = (
            score.at[used + 1].set(sib), depth.at[used + 1].set(d),
            rank.at[used + 1].set(r + 1), parent.at[used + 1].set(p))
        return (score, depth, rank, parent, used + 2), (tok, par, dep, val, vis)

    frontier = (score, depth, rank, parent, jnp.int32(1))
    _, (tok, par, dep, val, vis) = jax.lax.fori_loop(0, N, body, (frontier, out))
    return Tree(tok, par, dep, val, vis)


def walk(tree: Tree, anchor: jax.Array, chosen: jax.Array, depth: int
         ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Acceptance over a verified tree.

    ``chosen [B, N + 1]``: the token the AR view picked at each verify row (its argmax,
    or a draw from its distribution with an independent key per row); ``depth``: the
    tree's largest possible depth ``D``. Walking down from the anchor, a node is accepted
    when its parent was and its token is what the AR view chose at the parent; the
    deepest accepted row's choice is the next anchor.

    Returns ``new [B, D + 1]`` (the accepted tokens, then the next anchor at index ``j``;
    entries past it are filler), ``count = j + 1 [B]`` and ``path [B, D + 1]``: the
    verify row at each depth ``0 .. j`` of the accepted path (past ``j``: row 0), whose
    K/V go to the cache positions ``length + depth``.
    """
    B, N = tree.tokens.shape
    match = tree.valid & (tree.tokens == jnp.take_along_axis(chosen, tree.parents, axis=1))
    match = jnp.concatenate([jnp.ones((B, 1), bool), match], axis=1)  # [B, N + 1]
    accepted = ~jnp.any(tree.visible & ~match[:, None, :], axis=-1)  # every ancestor matched
    offsets = tree.offsets
    deepest = jnp.argmax(jnp.where(accepted, offsets, -1), axis=1)  # [B]
    j = jnp.take_along_axis(offsets, deepest[:, None], axis=1)[:, 0]
    at = accepted[:, None, :] & (offsets[:, None, :] == jnp.arange(depth + 1)[None, :, None])
    path = jnp.argmax(at, axis=-1).astype(jnp.int32)  # [B, D + 1], row 0 where none
    rows = tree.rows(anchor)
    on_path = jnp.take_along_axis(rows, path, axis=1)  # the path's tokens, anchor first
    nxt = jnp.take_along_axis(chosen, deepest[:, None], axis=1)[:, 0]
    idx = jnp.arange(depth + 1)[None, :]
    shifted = jnp.concatenate([on_path[:, 1:], on_path[:, :1]], axis=1)
    new = jnp.where(idx == j[:, None], nxt[:, None], shifted)
    return new, (j + 1).astype(jnp.int32), path
