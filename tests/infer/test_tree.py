"""Draft trees (:mod:`infer.tree`) and tree verification, on tiny random models (CPU).

- the best-first build equals a brute-force enumeration of the best prefix-closed paths;
- the walk equals a step-by-step reference walk;
- the tree's attention equals a dense-mask reference, and each node's hidden equals the
  causal pass over its own path;
- after an iteration, the cache holds exactly the K/V of a fresh prefill of the committed
  tokens;
- greedy tree decoding equals AR across budgets, batch sizes and cache fills;
- bad budgets are refused, a budget of 0 is plain AR.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infer import tree as trees
from infer.buckets import MAX_TREE_BUDGET
from infer.decode import DecodeInputs, orthrus_step, row_keys, start
from infer.engine import Generator
from infer.sampling import SamplingParams
from orthrus_jax.attention import attend, block_attention
from orthrus_jax.cache import init_cache
from orthrus_jax.model import prefill
from tests.infer.test_decode import _gen, _prompts


def _log_probs(seed: int, B: int, D: int, V: int) -> jax.Array:
    x = np.random.default_rng(seed).standard_normal((B, D, V)).astype(np.float32) * 2
    return jax.nn.log_softmax(jnp.asarray(x), axis=-1)


def _brute_force(lp: np.ndarray, budget: int, top: int) -> set[tuple[int, ...]]:
    """The ``budget`` best token paths (prefix-closed), by enumerating every path over the
    ``top`` best tokens per depth."""
    D = lp.shape[0]
    c = min(top, budget, lp.shape[1])
    order = np.argsort(-lp, axis=1)[:, :c]
    scored = []
    for d in range(1, D + 1):
        for ranks in itertools.product(range(c), repeat=d):
            toks = tuple(int(order[i, r]) for i, r in enumerate(ranks))
            scored.append((sum(lp[i, t] for i, t in enumerate(toks)), toks))
    scored.sort(key=lambda x: -x[0])
    return {toks for _, toks in scored[:budget]}


def _paths(tree: trees.Tree, b: int) -> list[tuple[int, ...]]:
    tokens, parents = np.asarray(tree.tokens[b]), np.asarray(tree.parents[b])
    out = []
    for i in range(tokens.shape[0]):
        path, row = [], i + 1
        while row:
            path.append(int(tokens[row - 1]))
            row = int(parents[row - 1])
        out.append(tuple(reversed(path)))
    return out


@pytest.mark.parametrize("budget,D,top", [(1, 3, 16), (7, 3, 16), (15, 4, 3), (20, 2, 16),
                                          (31, 7, 4)])
def test_build_is_the_best_prefix_closed_set(budget, D, top):
    B, V = 3, 12
    lp = _log_probs(budget, B, D, V)
    tree = trees.build(lp, budget, top)
    assert tree.tokens.shape == (B, budget)
    for b in range(B):
        parents, depths = np.asarray(tree.parents[b]), np.asarray(tree.depths[b])
        assert np.asarray(tree.valid[b]).all()
        assert (parents < np.arange(1, budget + 1)).all()  # a parent comes first
        parent_depth = np.concatenate([[0], depths])[parents]
        assert (depths == parent_depth + 1).all() and depths.max() <= D
        paths = _paths(tree, b)
        assert len(set(paths)) == budget  # siblings hold different tokens
        assert set(paths) == _brute_force(np.asarray(lp[b]), budget, top)
        scores = [sum(float(lp[b, i, t]) for i, t in enumerate(p)) for p in paths]
        assert all(x >= y - 1e-5 for x, y in zip(scores, scores[1:], strict=False))  # best first
        # visible: each row sees itself and exactly its ancestors
        vis = np.asarray(tree.visible[b])
        for row in range(budget + 1):
            want, r = {row}, row
            while r:
                r = int(parents[r - 1])
                want.add(r)
            assert set(np.nonzero(vis[row])[0]) == want


def test_a_budget_past_the_candidates_pads_with_invalid_nodes():
    lp = _log_probs(0, 2, 1, 12)  # one depth: at most TOP_CANDIDATES = 16 > 12 nodes ...
    tree = trees.build(lp, 14, top=4)  # ... here at most 4
    valid = np.asarray(tree.valid)
    assert valid[:, :4].all() and not valid[:, 4:].any()
    vis = np.asarray(tree.visible)
    assert (vis[:, 5:, :].sum(-1) == 1).all()  # an invalid node sees only itself


def _reference_walk(tree, b, anchor, chosen, D):
    tokens, parents = np.asarray(tree.tokens[b]), np.asarray(tree.parents[b])
    valid = np.asarray(tree.valid[b])
    row, out, path = 0, [], [0]
    while True:
        want = int(chosen[b, row])
        kids = [i + 1 for i in range(len(tokens)) if parents[i] == row and valid[i]
                and tokens[i] == want]
        if not kids:
            return out + [want], path
        row = kids[0]
        out.append(want)
        path.append(row)


@pytest.mark.parametrize("seed", range(4))
def test_walk_follows_the_chosen_tokens(seed):
    B, D, V, budget = 4, 4, 6, 11
    rng = np.random.default_rng(seed)
    tree = trees.build(_log_probs(seed, B, D, V), budget)
    anchor = jnp.asarray(rng.integers(0, V, B), jnp.int32)
    # choices that often agree with a node: pick a child's token at random rows
    chosen = rng.integers(0, V, (B, budget + 1))
    tokens, parents = np.asarray(tree.tokens), np.asarray(tree.parents)
    for b in range(B):
        for i in rng.permutation(budget)[:budget // 2]:
            chosen[b, parents[b, i]] = tokens[b, i]
    new, count, path = trees.walk(tree, anchor, jnp.asarray(chosen, jnp.int32), D)
    for b in range(B):
        want, want_path = _reference_walk(tree, b, anchor, chosen, D)
        n = int(count[b])
        assert np.asarray(new[b, :n]).tolist() == want
        assert np.asarray(path[b, :n]).tolist() == want_path
    assert int(count.max()) > 1  # some rows accepted nodes


def test_tree_attention_equals_a_dense_mask():
    rng = np.random.default_rng(0)
    B, Hq, Hkv, hd, S, T = 2, 4, 2, 8, 10, 6
    q = jnp.asarray(rng.standard_normal((B, T, Hq, hd)), jnp.float32)
    kc, vc = (jnp.asarray(rng.standard_normal((B, Hkv, S, hd)), jnp.float32) for _ in "kv")
    kb, vb = (jnp.asarray(rng.standard_normal((B, T, Hkv, hd)), jnp.float32) for _ in "kv")
    lengths = jnp.asarray([3, 7])
    tree = trees.build(_log_probs(1, B, 3, 9), T - 1)
    got = block_attention(q[:, None], kc, vc, kb[:, None], vb[:, None], lengths[:, None],
                          tree.visible[:, None])[:, 0]
    # dense: keys = the cache then the block, mask [B, T, S + T]
    k = jnp.concatenate([kc, kb.transpose(0, 2, 1, 3)], axis=2)
    v = jnp.concatenate([vc, vb.transpose(0, 2, 1, 3)], axis=2)
    prefix = jnp.arange(S)[None, None, :] < lengths[:, None, None]
    mask = jnp.concatenate([jnp.broadcast_to(prefix, (B, T, S)), tree.visible], axis=2)
    np.testing.assert_allclose(got, attend(q, k, v, mask), rtol=1e-5, atol=1e-5)


def _tree_state(name: str, B: int, budget: int, block: int):
    gen = _gen(name)
    model = gen.model
    prompts = _prompts(7, B)
    P = 16
    padded = np.zeros((B, P), np.int32)
    for i, p in enumerate(prompts):
        padded[i, :len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    spec = gen.spec("orthrus", (block,), True, B, P, 32, 8, budget)
    inputs = DecodeInputs(jnp.full((B,), 32, jnp.int32), jnp.full((8,), -1, jnp.int32),
                          SamplingParams.make(0.0))
    state = start(model, jnp.asarray(padded), lengths, inputs,
                  row_keys(jax.random.key(0), jnp.arange(B)), spec)
    return gen, model, prompts, state, inputs


def test_each_node_sees_its_path():
    """The hidden of every tree row equals the last hidden of a causal pass over the
    committed cache and the row's own path (anchor to node)."""
    gen, model, prompts, state, _ = _tree_state("qwen3-untied-K8", 2, 9, 4)
    from infer.decode import draft_tree
    tree = draft_tree(model, state, 4, 9)
    hidden, _ = model.tree_hidden(tree.rows(state.anchor), tree.offsets, tree.visible,
                                  state.cache)
    rows = np.asarray(tree.rows(state.anchor))
    vis = np.asarray(tree.visible)
    for b in range(2):
        one = jax.tree.map(lambda a, b=b: a[b:b + 1] if a.ndim else a, state.cache)
        for r in range(rows.shape[1]):
            path = rows[b, np.nonzero(vis[b, r])[0]]  # ancestors in row order = depth order
            ref, _ = model.ar_hidden(jnp.asarray(path[None], jnp.int32), one)
            np.testing.assert_allclose(hidden[b, r], ref[0, -1], rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("budget", [3, 12])
def test_cache_after_a_tree_iteration_equals_a_fresh_prefill(budget):
    B, block = 3, 4
    gen, model, prompts, state, inputs = _tree_state("agree", B, budget, block)
    anchors = np.asarray(state.anchor)
    state = orthrus_step(model, state, inputs, block, True, budget)
    state = orthrus_step(model, state, inputs, block, True, budget)
    n = np.asarray(state.num_generated)
    assert (n > 3).any()  # some row accepted drafts
    tokens = np.asarray(state.tokens)
    for b in range(B):
        committed = list(prompts[b]) + tokens[b, :n[b] - 1].tolist()  # the anchor is not cached
        assert tokens[b, 0] == anchors[b]
        L = len(committed)
        assert int(state.cache.lengths[b]) == L
        fresh = init_cache(model.config, 1, 64, per_layer=model.per_layer)
        _, fresh = prefill(model, jnp.asarray([committed], jnp.int32), fresh,
                           jnp.asarray([L], jnp.int32))
        for got, want in ((state.cache.k, fresh.k), (state.cache.v, fresh.v)):
            for layer in range(len(got)):
                np.testing.assert_allclose(got[layer][b, :, :L], want[layer][0, :, :L],
                                           rtol=2e-4, atol=2e-4)


TREE_CASES = [("agree", 1, 7), ("agree", 4, 3), ("qwen3-tied-K16", 4, 20),
              ("llama-untied-K4", 2, 31), ("llama-tied-K8", 8, 5)]


@pytest.mark.slow
@pytest.mark.parametrize("name,batch_size,budget", TREE_CASES,
                         ids=[f"{n}-b{b}-n{t}" for n, b, t in TREE_CASES])
def test_greedy_tree_equals_ar(name, batch_size, budget):
    gen = _gen(name)
    prompts = _prompts(seed=300 + budget)
    ar = gen.generate(prompts, mode="ar", max_new_tokens=24, batch_size=batch_size)
    tree = gen.generate(prompts, max_new_tokens=24, batch_size=batch_size,
                        tree_budget=budget)
    assert [r.token_ids for r in tree] == [r.token_ids for r in ar]
    assert [r.finish_reason for r in tree] == [r.finish_reason for r in ar]
    assert sum(r.iterations for r in tree) < sum(r.iterations for r in ar)


def test_tree_fills_a_cache_like_ar():
    """Prompts straddling the prompt buckets and a cache that fills: the tree's last
    iterations write past the end of the cache; the outputs still equal AR's."""
    gen = Generator(_gen("agree").model, max_len=48)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 512, n).tolist() for n in (15, 16, 17, 30)]
    ar = gen.generate(prompts, mode="ar", max_new_tokens=40, batch_size=2)
    tree = gen.generate(prompts, max_new_tokens=40, batch_size=2, tree_budget=6)
    assert [r.token_ids for r in tree] == [r.token_ids for r in ar]
    assert {r.finish_reason for r in ar} == {"cache_full"}
    assert [r.finish_reason for r in tree] == [r.finish_reason for r in ar]


def test_budget_zero_is_plain_ar_and_bad_budgets_are_refused():
    gen = _gen("llama-untied-K4")
    prompts = _prompts(3, 2)
    zero = gen.generate(prompts, max_new_tokens=8, tree_budget=0)
    assert all(r.iterations == 7 and r.block_hist[0] == 7 for r in zero)
    for bad in (-1, MAX_TREE_BUDGET + 1, "many", 2.5):
        with pytest.raises(ValueError, match="tree budget"):
            gen.generate(prompts, max_new_tokens=8, tree_budget=bad)
    with pytest.raises(ValueError, match="block size of at least 2"):
        gen.generate(prompts, max_new_tokens=8, block_size=1, tree_budget=3)
    with pytest.raises(ValueError, match="mode 'orthrus' only"):
        gen.generate(prompts, mode="ar", max_new_tokens=8, tree_budget=3)
    with pytest.raises(ValueError, match="tree_budget"):
        dataclasses.replace(gen.spec("orthrus", (4,), True, 1, 16, 8, 8), tree_budget=-1)


@pytest.mark.parametrize("value", ["-1", "256", "x", "2.5"])
@pytest.mark.parametrize("cli", ["generate", "bench", "serve.cli"])
def test_bad_tree_budget_flags_are_refused_naming_the_flag(cli, value, capsys):
    import importlib

    parser = importlib.import_module(f"infer.{cli}").build_parser()
    needed = ["--prompts-file", "p.jsonl"] if cli == "bench" else []
    with pytest.raises(SystemExit) as e:
        parser.parse_args([*needed, "--tree-budget", value])
    assert e.value.code == 2
    assert "argument --tree-budget" in capsys.readouterr().err
    assert parser.parse_args([*needed, "--tree-budget", "auto"]).tree_budget == "auto"
    assert parser.parse_args([*needed, "--tree-budget", "31"]).tree_budget == 31
    assert parser.parse_args([*needed, "--tree-budget", "none"]).tree_budget == "none"


@pytest.mark.slow
def test_sharded_trees_equal_unsharded():
    """Trees on a model sharded over data, tensor and fsdp axes (KV heads and the batch
    split over devices) give the unsharded greedy outputs."""
    from orthrus_jax.sharding import make_mesh, shard_model
    from tests.infer.test_decode import _model

    name = "qwen3-untied-K8"
    prompts = _prompts(seed=41)
    ref = _gen(name).generate(prompts, max_new_tokens=16, batch_size=4, tree_budget=9)
    mesh = make_mesh({"data": 2, "tensor": 2, "fsdp": 2})
    gen = Generator(shard_model(_model(name), mesh))
    out = gen.generate(prompts, max_new_tokens=16, batch_size=4, tree_budget=9)
    assert [r.token_ids for r in out] == [r.token_ids for r in ref]
