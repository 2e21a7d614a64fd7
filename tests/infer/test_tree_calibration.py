"""Fitted tree scoring (:class:`infer.tree.TreeScoring`, :mod:`infer.tree_calibration`):

- a calibrated tree is the best prefix-closed set under the calibrated scores;
- the product scoring builds the tree the log-probabilities build;
- the fit counts hits among reachable candidates exactly, smoothed toward the draft's own
  probability, monotone along the bins;
- the candidates it fits on are the drafts decoding sees at each anchor;
- decoding with a calibrated profile stays lossless, and the profile's table round-trips
  and is refused when malformed.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer import tree as trees
from infer import tree_calibration as tc
from infer.block_size import AcceptanceProfile
from orthrus_jax.cache import init_cache
from orthrus_jax.model import prefill
from tests.infer.test_decode import _gen, _prompts
from tests.infer.test_tree import _brute_force, _log_probs, _paths


def _table(seed: int, D: int) -> np.ndarray:
    """A random valid table: non-positive, non-decreasing along the bins."""
    x = np.random.default_rng(seed).uniform(-3, 0, (D, trees.SCORE_BINS))
    return np.sort(x, axis=1)


@pytest.mark.parametrize("budget,D,top", [(7, 3, 16), (15, 4, 3), (31, 5, 4)])
def test_calibrated_build_is_the_best_prefix_closed_set(budget, D, top):
    B, V = 3, 12
    lp = _log_probs(budget + 1, B, D, V)
    scoring = trees.TreeScoring.calibrated(_table(budget, D - 1), D)  # last row repeated
    tree = trees.build(lp, budget, top, scoring=scoring)
    plain = trees.build(lp, budget, top)
    score = np.asarray(scoring.score(lp))  # [B, D, V]: elementwise, the order of lp per depth
    for b in range(B):
        paths = _paths(tree, b)
        assert set(paths) == _brute_force(score[b], budget, top)
        scores = [sum(float(score[b, i, t]) for i, t in enumerate(p)) for p in paths]
        assert all(x >= y - 1e-5 for x, y in zip(scores, scores[1:], strict=False))
    assert any(set(_paths(tree, b)) != set(_paths(plain, b)) for b in range(B))


def test_product_scoring_builds_the_log_probability_tree():
    lp = _log_probs(3, 2, 4, 20)
    a, b = trees.build(lp, 15), trees.build(lp, 15, scoring=trees.TreeScoring.product(4))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_fit_counts_hits_among_reachable_candidates():
    bin_of = lambda v: int(np.searchsorted(trees.SCORE_EDGES, np.log(v), side="right"))  # noqa: E731
    # two anchors, D = 2, two candidates per depth
    lp = np.log(np.array([[[0.9, 0.05], [0.6, 0.3]],
                          [[0.9, 0.05], [0.6, 0.3]]], np.float32))
    ids = np.array([[[1, 2], [3, 4]], [[1, 2], [3, 4]]])
    true = np.array([[1, 4],    # depth 1 hit (rank 0), depth 2 hit (rank 1)
                     [7, 3]])   # depth 1 missed: its depth 2 is unreachable
    p = np.exp(tc.bin_log_probs())  # the prior: one candidate hitting at the bin's rate
    raw = np.tile(p, (2, 1))
    raw[0, bin_of(0.9)] = (1 + p[bin_of(0.9)]) / 3  # 2 reachable, 1 hit
    raw[0, bin_of(0.05)] = (0 + p[bin_of(0.05)]) / 3  # 2 reachable, 0 hits
    raw[1, bin_of(0.6)] = (0 + p[bin_of(0.6)]) / 2  # 1 reachable (anchor 0), 0 hits
    raw[1, bin_of(0.3)] = (1 + p[bin_of(0.3)]) / 2  # 1 reachable, 1 hit
    table = tc.fit(lp, ids, true)
    np.testing.assert_allclose(table, np.maximum.accumulate(np.log(raw), axis=1), rtol=1e-6)
    assert table[1, bin_of(0.6)] == table[1, bin_of(0.3)]  # lifted: never below a lower bin
    assert (table <= 0).all() and (np.diff(table, axis=1) >= 0).all()


def test_fit_refuses_mismatched_arrays():
    with pytest.raises(ValueError, match="must be"):
        tc.fit(np.zeros((3, 2, 4)), np.zeros((3, 2, 4)), np.zeros((3, 3)))


def test_candidates_are_the_drafts_decoding_sees():
    gen = _gen("qwen3-tied-K16")
    model, block = gen.model, 5
    prompt = _prompts(seed=40, n=2)[1]
    output = gen.generate([prompt], mode="ar", max_new_tokens=10)[0].token_ids
    lp, ids, true = tc.candidates(model, prompt, output, block, top=4)
    T, D = len(output) - 1, block - 1
    assert lp.shape == ids.shape == (T, D, 4) and true.shape == (T, D)
    seq = list(prompt) + list(output)
    n = len(prompt)
    for t in (0, 3, T - 1):
        p = n + t  # the anchor's position; the cache holds the tokens before it
        np.testing.assert_array_equal(true[t], [seq[p + 1 + d] if p + 1 + d < len(seq) else -1
                                                for d in range(D)])
        cache = init_cache(model.config, 1, 64, per_layer=model.per_layer)
        _, cache = prefill(model, jnp.asarray([seq[:p]], jnp.int32), cache,
                           jnp.asarray([p], jnp.int32))
        masks = [model.config.mask_token_id] * D
        hidden = model.diffusion_hidden(jnp.asarray([[seq[p]] + masks], jnp.int32), cache)
        want_lp, want_ids = jax.lax.top_k(
            jax.nn.log_softmax(model.logits(hidden[:, :-1]), axis=-1), 4)
        np.testing.assert_array_equal(ids[t], np.asarray(want_ids[0]))
        np.testing.assert_allclose(lp[t], np.asarray(want_lp[0]), atol=2e-4)


@pytest.mark.slow
def test_calibrated_trees_decode_losslessly():
    gen = _gen("llama-tied-K8")
    prompts = _prompts(seed=41)
    ar = gen.generate(prompts, mode="ar", max_new_tokens=24, batch_size=4)
    plain = gen.generate(prompts, max_new_tokens=24, batch_size=4, tree_budget=9)
    table = tc.measure(gen.model, [(p, r.token_ids) for p, r in zip(prompts, ar, strict=True)],
                       gen.config.block_size)
    try:
        gen.profile = AcceptanceProfile(gen.config.block_size, (1,) * gen.config.block_size,
                                        tree_calibration=tuple(map(tuple, table)))
        calibrated = gen.generate(prompts, max_new_tokens=24, batch_size=4, tree_budget=9)
    finally:
        gen.profile = None
    assert [r.token_ids for r in calibrated] == [r.token_ids for r in ar]
    assert [r.token_ids for r in plain] == [r.token_ids for r in ar]


def test_profile_keeps_its_table_and_refuses_a_bad_one(tmp_path):
    table = tuple(map(tuple, _table(0, 3)))
    profile = AcceptanceProfile(4, (1, 2, 3, 4), "x", ((5, (1, 1, 1, 1)),), table)
    profile.save(tmp_path)
    back = AcceptanceProfile.load(tmp_path)
    np.testing.assert_allclose(back.tree_calibration, table, atol=1e-6)
    d = json.loads((tmp_path / "acceptance.json").read_text())
    for field, value, match in [
            ("edges", [-1.0], "edges"),
            ("log_hit_rate", [row[::-1] for row in d["tree_calibration"]["log_hit_rate"]],
             "non-decreasing"),
            ("log_hit_rate", d["tree_calibration"]["log_hit_rate"][:2], "3 rows"),
            ("log_hit_rate", [[0.5] * trees.SCORE_BINS] * 3, "<= 0")]:
        bad = json.loads(json.dumps(d))
        bad["tree_calibration"][field] = value
        (tmp_path / "acceptance.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            AcceptanceProfile.load(tmp_path)
