"""Attention that follows the live length: a cache's static ``windows`` let each pass read
the smallest prefix holding every position its queries see (``over_window``).

Every view over a windowed cache equals the same view over the whole cache at fills
straddling each window (one below, at, one past), rows of one batch at different lengths,
in both cache forms; the compiled pass holds one branch per window; the windows survive
every cache operation.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infer import tree as trees
from orthrus_jax.attention import block_attention, causal_cache_attention, over_window
from orthrus_jax.cache import (
    MIN_WINDOW,
    attention_windows,
    init_cache,
    stack_cache,
    unstack_cache,
    write_rows,
)
from orthrus_jax.config import ModelConfig
from orthrus_jax.model import OrthrusLM, prefill, unstack_layers

TOL = 1e-5
MAX_LEN = 64
WINDOWS = (8, 16, 32)
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=128, block_size=4, mask_token_id=3,
            dtype="float32", param_dtype="float32")
# Each window's boundary from both sides, and past the largest (the whole cache).
NEEDS = sorted({n for w in WINDOWS for n in (w - 1, w, w + 1)} | {MAX_LEN - 1})


def test_attention_windows_are_powers_of_two_below_the_cache():
    assert attention_windows(8192) == (256, 512, 1024, 2048, 4096)
    assert attention_windows(2048) == (256, 512, 1024)
    assert attention_windows(300) == (256,)
    assert attention_windows(MIN_WINDOW) == ()
    assert attention_windows(64, smallest=8) == (8, 16, 32)


@pytest.mark.parametrize("windows", [(8, 8), (16, 8), (0, 8), (8, 64), (8, 100)])
def test_bad_windows_are_refused(windows):
    config = ModelConfig(**TINY)
    with pytest.raises(ValueError, match="windows"):
        init_cache(config, 1, MAX_LEN, windows=windows)


def _kv(key, B=2, Hkv=2, S=MAX_LEN, hd=16):
    k1, k2 = jax.random.split(key)
    return (jax.random.normal(k1, (B, Hkv, S, hd)), jax.random.normal(k2, (B, Hkv, S, hd)))


@pytest.mark.parametrize("need", NEEDS)
def test_causal_attention_over_a_window_equals_the_whole_cache(need):
    k, v = _kv(jax.random.key(need))
    T = 3
    q = jax.random.normal(jax.random.key(100 + need), (2, T, 4, 16))
    # row 0 ends exactly at `need`, row 1 shorter
    lengths = jnp.array([need - T, max(need - T - 5, 0)])
    positions = lengths[:, None] + jnp.arange(T)[None, :]

    def att(kc, vc):
        return causal_cache_attention(q, kc, vc, positions)
    whole = att(k, v)
    windowed = jax.jit(lambda k, v, n: over_window(att, k, v, WINDOWS, n))(k, v, need)
    np.testing.assert_allclose(windowed, whole, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("need", NEEDS)
def test_block_attention_over_a_window_equals_the_whole_cache(need):
    k, v = _kv(jax.random.key(need))
    m, K = 2, 4
    keys = jax.random.split(jax.random.key(200 + need), 3)
    q = jax.random.normal(keys[0], (2, m, K, 4, 16))
    kb, vb = (jax.random.normal(x, (2, m, K, 2, 16)) for x in keys[1:])
    prefix = jnp.array([[need, need // 2], [max(need - 3, 1), 1]])

    def att(kc, vc):
        return block_attention(q, kc, vc, kb, vb, prefix)
    windowed = jax.jit(lambda k, v, n: over_window(att, k, v, WINDOWS, n))(k, v, need)
    np.testing.assert_allclose(windowed, att(k, v), atol=TOL, rtol=TOL)


def test_a_window_too_short_would_change_the_result():
    """The negative control: reading fewer positions than the queries see differs."""
    k, v = _kv(jax.random.key(0))
    q = jax.random.normal(jax.random.key(1), (2, 1, 4, 16))
    positions = jnp.array([[20], [20]])

    def att(kc, vc):
        return causal_cache_attention(q, kc, vc, positions)
    short = over_window(att, k, v, WINDOWS, jnp.int32(10))  # claims 10, the queries see 21
    assert float(jnp.max(jnp.abs(short - att(k, v)))) > 1e-3


def test_one_branch_per_window_in_the_compiled_pass():
    k, v = _kv(jax.random.key(0))
    q = jax.random.normal(jax.random.key(1), (2, 1, 4, 16))

    def f(k, v, n):
        return over_window(lambda kc, vc: causal_cache_attention(q, kc, vc, jnp.zeros(
            (2, 1), jnp.int32)), k, v, WINDOWS, n)
    conds = [e for e in jax.make_jaxpr(f)(k, v, 1).eqns if e.primitive.name == "cond"]
    assert len(conds) == 1 and len(conds[0].params["branches"]) == len(WINDOWS) + 1
    # no windows, or none shorter than the cache: no branch at all
    for windows in [(), (MAX_LEN * 2,)]:
        eqns = jax.make_jaxpr(lambda k, v, n, w=windows: over_window(
            lambda kc, vc: causal_cache_attention(q, kc, vc, jnp.zeros((2, 1), jnp.int32)),
            k, v, w, n))(k, v, 1).eqns
        assert not [e for e in eqns if e.primitive.name == "cond"]


@pytest.fixture(scope="module")
def model():
    return nnx.jit(lambda: OrthrusLM(ModelConfig(**TINY), rngs=nnx.Rngs(0)))()


@pytest.mark.parametrize("per_layer", [False, True])
def test_every_view_over_a_windowed_cache_equals_the_whole_cache(model, per_layer):
    """Prefill rows to fills straddling each window, then an AR chunk, the diffusion
    view, a tree's verify pass and its accepted path's write: all equal to the same calls
    on a cache without windows."""
    m = unstack_layers(model) if per_layer else model
    rng = np.random.default_rng(0)
    B, K = 2, 4
    tokens = jnp.asarray(rng.integers(4, 64, (B, 48)), jnp.int32)
    draft = jnp.asarray(rng.integers(4, 64, (B, K)), jnp.int32)
    tree = trees.build(jax.nn.log_softmax(
        jax.random.normal(jax.random.key(3), (B, K - 1, 64)) * 3), 6)

    @nnx.jit(static_argnums=(1,))
    def views(m, windows, lengths):
        cache = init_cache(m.config, B, MAX_LEN, per_layer=per_layer, windows=windows)
        logits, cache = prefill(m, tokens, cache, lengths, chunk_size=16)
        hidden, after = m.ar_hidden(draft, cache)
        diff = m.diffusion_hidden(draft.at[:, 1:].set(3), cache)
        tree_h, (tk, tv) = m.tree_hidden(tree.rows(draft[:, 0]), tree.offsets, tree.visible,
                                         cache)
        path = jnp.tile(jnp.arange(3)[None, :], (B, 1))
        written = write_rows(cache, tk, tv, path)
        assert after.windows == written.windows == windows
        return logits, hidden, diff, tree_h, after.k, written.k, after.v

    for fill in NEEDS[:-1]:
        lengths = jnp.array([fill - K, max(fill - K - 7, 1)], jnp.int32)
        want = views(m, (), lengths)
        got = views(m, WINDOWS, lengths)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, atol=TOL, rtol=TOL)


def test_windows_survive_the_cache_forms():
    config = ModelConfig(**TINY)
    cache = init_cache(config, 2, MAX_LEN, windows=WINDOWS)
    per = unstack_cache(cache)
    assert per.per_layer and per.windows == WINDOWS
    assert stack_cache(per).windows == WINDOWS
    flat, treedef = jax.tree.flatten(cache)
    assert jax.tree.unflatten(treedef, flat).windows == WINDOWS
    assert dataclasses.replace(cache, lengths=cache.lengths + 1).windows == WINDOWS


@pytest.mark.parametrize("per_layer", [False, True])
def test_a_prefill_into_other_rows_of_a_larger_cache_equals_a_cache_of_its_own(model,
                                                                               per_layer):
    """``prefill(..., rows=)``: prompts written straight into rows 3 and 1 of a 4-row
    windowed cache (after a prefix already there) give the logits and K/V of a 2-row
    cache of their own; rows 0 and 2 are neither read nor changed."""
    m = unstack_layers(model) if per_layer else model
    rng = np.random.default_rng(1)
    prefix = jnp.asarray(rng.integers(4, 64, (2, 20)), jnp.int32)
    tokens = jnp.asarray(rng.integers(4, 64, (2, 16)), jnp.int32)
    lengths = jnp.array([16, 11], jnp.int32)
    rows = jnp.array([3, 1], jnp.int32)

    @nnx.jit
    def own(m):
        cache = init_cache(m.config, 2, MAX_LEN, per_layer=per_layer, windows=WINDOWS)
        _, cache = prefill(m, prefix, cache, jnp.array([20, 9], jnp.int32))
        return prefill(m, tokens, cache, lengths)

    @nnx.jit
    def into_rows(m):
        big = init_cache(m.config, 4, MAX_LEN, per_layer=per_layer, windows=WINDOWS)
        noise = jax.random.normal(jax.random.key(7), big.k[0].shape if per_layer
                                  else big.k.shape)
        fill = (lambda kv: tuple(noise + i for i in range(len(kv)))) if per_layer else \
            (lambda kv: noise)
        big = dataclasses.replace(big, k=fill(big.k), v=fill(big.v))
        sub = dataclasses.replace(big, lengths=jnp.zeros((2,), jnp.int32))
        _, sub = prefill(m, prefix, sub, jnp.array([20, 9], jnp.int32), rows=rows)
        logits, sub = prefill(m, tokens, sub, lengths, rows=rows)
        return logits, sub, big

    want_logits, want = own(m)
    logits, got, before = into_rows(m)
    np.testing.assert_allclose(logits, want_logits, atol=TOL, rtol=TOL)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    for g, w, b in ((got.k, want.k, before.k), (got.v, want.v, before.v)):
        g, w, b = (np.asarray(stack_cache(dataclasses.replace(got, k=x)).k)
                   for x in (g, w, b))
        live = [20 + 16, 9 + 11]
        for i, r in enumerate((3, 1)):
            np.testing.assert_allclose(g[:, r, :, :live[i]], w[:, i, :, :live[i]],
                                       atol=TOL, rtol=TOL)
        np.testing.assert_array_equal(g[:, [0, 2]], b[:, [0, 2]])
