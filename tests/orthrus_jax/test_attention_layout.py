"""The head-major KV cache (``[B, Hkv, S, hd]`` per layer, stacked or per layer) and its
attention against the previous formulation, kept here as the reference: a position-major
cache ``[L, B, S, Hkv, hd]``, one softmax over the concatenated prefix and block scores.

Rows of one batch sit at different lengths, and blocks straddle the cache's end (their
K/V past ``max_len`` are dropped), for both views.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from orthrus_jax.attention import attend, block_attention, causal_cache_attention
from orthrus_jax.cache import (
    KVCache,
    init_cache,
    layer_kv,
    stack_cache,
    unstack_cache,
    write_block,
)
from orthrus_jax.config import ModelConfig
from orthrus_jax.model import OrthrusLM, prefill, unstack_layers

TOL = 1e-5
_NEG = -1e30
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=256, block_size=4, mask_token_id=3,
            dtype="float32", param_dtype="float32")


# ---------------------------------------------------------------- the old formulation
def old_attend(q, k, v, mask):
    """q ``[B, T, Hq, hd]``; k, v ``[B, S, Hkv, hd]``; mask ``[B, T, S]``."""
    B, T, Hq, hd = q.shape
    Hkv = k.shape[2]
    qg = q.reshape(B, T, Hkv, Hq // Hkv, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(q.dtype),
                        preferred_element_type=jnp.float32) * hd**-0.5
    scores = jnp.where(mask[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(q.dtype))
    return out.reshape(B, T, Hq, hd)


def old_causal(q, k_cache, v_cache, q_positions):
    key_pos = jnp.arange(k_cache.shape[1])
    return old_attend(q, k_cache, v_cache, key_pos[None, None, :] <= q_positions[:, :, None])


def old_block(q, k_cache, v_cache, k_block, v_block, prefix_lengths):
    B, m, K, Hq, hd = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    qg = q.reshape(B, m, K, Hkv, Hq // Hkv, hd)
    dt = q.dtype
    s_prefix = jnp.einsum("bmqkgd,bskd->bmkgqs", qg, k_cache.astype(dt),
                          preferred_element_type=jnp.float32)
    visible = jnp.arange(S)[None, None, :] < prefix_lengths[:, :, None]
    s_prefix = jnp.where(visible[:, :, None, None, None, :], s_prefix, _NEG)
    s_block = jnp.einsum("bmqkgd,bmtkd->bmkgqt", qg, k_block.astype(dt),
                         preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(jnp.concatenate([s_prefix, s_block], -1) * hd**-0.5, axis=-1)
    probs = probs.astype(dt)
    out = (jnp.einsum("bmkgqs,bskd->bmqkgd", probs[..., :S], v_cache.astype(dt))
           + jnp.einsum("bmkgqt,bmtkd->bmqkgd", probs[..., S:], v_block.astype(dt)))
    return out.reshape(B, m, K, Hq, hd)


def old_write(cache_kv, layer, new, positions):
    """Into a stacked position-major cache ``[L, B, S, Hkv, hd]``."""
    rows = jnp.arange(new.shape[0])[:, None]
    return cache_kv.at[layer, rows, positions].set(new.astype(cache_kv.dtype), mode="drop")


def head_major(kv):
    """``[..., B, S, Hkv, hd]`` -> ``[..., B, Hkv, S, hd]``."""
    return jnp.swapaxes(kv, -3, -2)


# ---------------------------------------------------------------- the functions
def _rand(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("S", [16, 32])
def test_causal_attention_equals_the_old_one(T, S):
    rng = np.random.default_rng(T * 100 + S)
    B, Hq, Hkv, hd = 3, 6, 2, 8
    q = _rand(rng, B, T, Hq, hd)
    k, v = _rand(rng, B, S, Hkv, hd), _rand(rng, B, S, Hkv, hd)
    # Rows at their own lengths; the last row's chunk runs past the cache's end.
    lengths = jnp.array([0, S // 2 + 1, S - 2])
    positions = lengths[:, None] + jnp.arange(T)[None, :]
    new = causal_cache_attention(q, head_major(k), head_major(v), positions)
    np.testing.assert_allclose(np.asarray(new), np.asarray(old_causal(q, k, v, positions)),
                               atol=TOL)
    mask = jnp.arange(S)[None, None, :] < (positions[:, :, None] + 1)
    np.testing.assert_allclose(np.asarray(attend(q, head_major(k), head_major(v), mask)),
                               np.asarray(new), atol=TOL)


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("S", [16, 32])
def test_block_attention_equals_the_old_one(m, S):
    rng = np.random.default_rng(m * 100 + S)
    B, K, Hq, Hkv, hd = 2, 4, 6, 2, 8
    q = _rand(rng, B, m, K, Hq, hd)
    k, v = _rand(rng, B, S, Hkv, hd), _rand(rng, B, S, Hkv, hd)
    kb, vb = _rand(rng, B, m, K, Hkv, hd), _rand(rng, B, m, K, Hkv, hd)
    # Empty prefix, a full cache, and lengths on either side of half the cache.
    prefix = jnp.asarray(rng.choice([0, S // 2 - 1, S // 2 + 1, S], (B, m)), jnp.int32)
    new = block_attention(q, head_major(k), head_major(v), kb, vb, prefix)
    old = old_block(q, k, v, kb, vb, prefix)
    np.testing.assert_allclose(np.asarray(new), np.asarray(old), atol=TOL)


@pytest.mark.parametrize("per_layer", [False, True])
def test_write_block_equals_the_old_one_in_both_forms(per_layer):
    rng = np.random.default_rng(3)
    L, B, S, Hkv, hd, T = 3, 2, 8, 2, 4, 3
    old = _rand(rng, L, B, S, Hkv, hd)
    cache = KVCache(head_major(old), head_major(old), jnp.zeros((B,), jnp.int32))
    kv = unstack_cache(cache).k if per_layer else cache.k
    positions = jnp.array([[2, 3, 4], [6, 7, 8]])  # row 1's last position is dropped
    for layer in range(L):
        new = _rand(rng, B, T, Hkv, hd)
        old = old_write(old, layer, new, positions)
        kv = write_block(kv, layer, new, positions)
        assert isinstance(kv, tuple) == per_layer
        np.testing.assert_array_equal(np.asarray(layer_kv(kv, layer)),
                                      np.asarray(head_major(old[layer])))
    stacked = jnp.stack(kv) if per_layer else kv
    np.testing.assert_array_equal(np.asarray(stacked), np.asarray(head_major(old)))


def test_cache_forms():
    c = ModelConfig(**TINY)
    stacked = init_cache(c, 3, 16)
    per_layer = init_cache(c, 3, 16, per_layer=True)
    assert stacked.k.shape == (2, 3, 2, 16, 16) and not stacked.per_layer
    assert per_layer.per_layer and len(per_layer.k) == 2 and per_layer.k[0].shape == (3, 2, 16, 16)
    for cache in (stacked, per_layer):
        assert (cache.max_len, cache.batch_size) == (16, 3)
    assert (stacked.batch_axis, per_layer.batch_axis) == (1, 0)
    assert stack_cache(per_layer).k.shape == stacked.k.shape
    assert unstack_cache(stacked).per_layer and stack_cache(stacked) is stacked


# ---------------------------------------------------------------- the model, both forms
@pytest.fixture(scope="module")
def models():
    model = nnx.jit(lambda: OrthrusLM(ModelConfig(**TINY), rngs=nnx.Rngs(0)))()
    # Make the diffusion view differ from the AR view.
    for var in vars(model.layers.diff_attn).values():
        if isinstance(var, nnx.Variable):
            var.set_value(var.get_value() * 1.1)
    return model, unstack_layers(model)


def _decode_calls(m, cache, prompt, lengths, block):
    """Prefill (chunked), a verify block, a diffusion pass, and the stacked K/V."""
    logits, cache = prefill(m, prompt, cache, lengths, chunk_size=4)
    verify, cache = m(block, cache)
    draft = m.logits(m.diffusion_hidden(block, cache))
    return logits, verify, draft, stack_cache(cache).k, cache.lengths


@pytest.mark.parametrize("max_len", [14, 24])
def test_per_layer_cache_decodes_like_the_stacked_one(models, max_len):
    """Per-layer weights over a per-layer cache (the decoder) give the stacked model's
    outputs over a stacked cache, at rows of different lengths (at 14 positions, row 0's
    verify block runs past the cache's end)."""
    stacked_model, per_layer_model = models
    rng = np.random.default_rng(max_len)
    prompt = jnp.asarray(rng.integers(0, 64, (3, 12)))
    lengths = jnp.array([12, 9, 5])
    block = jnp.asarray(rng.integers(0, 64, (3, 4)))
    run = jax.jit(_decode_calls)
    ref = run(stacked_model, init_cache(stacked_model.config, 3, max_len), prompt, lengths,
              block)
    for model, per_layer in ((per_layer_model, True), (per_layer_model, False),
                             (stacked_model, True)):
        out = run(model, init_cache(model.config, 3, max_len, per_layer=per_layer), prompt,
                  lengths, block)
        for a, b in zip(out, ref, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL)


def test_model_equals_the_old_attention(models):
    """One AR chunk and one diffusion pass of the model, against the same layers run with
    the old attention over a position-major cache, rows at different lengths."""
    _, model = models
    c = model.config
    rng = np.random.default_rng(11)
    B, S = 2, 16
    prefix = jnp.asarray(rng.integers(0, 64, (B, 10)))
    chunk = jnp.asarray(rng.integers(0, 64, (B, 4)))
    start = init_cache(c, B, S, per_layer=True)
    _, start = model(prefix, start, num_valid=jnp.array([10, 13 - 4]))  # lengths 10, 9
    lengths = start.lengths
    # The reference: the same decoder body with the old attention and cache layout.
    from orthrus_jax.layers import mlp, project_out, project_qkv, rms_norm
    from orthrus_jax.rope import rope_tables

    def layer_params(view, i):
        layers = nnx.to_pure_dict(nnx.state(model.layers))
        pick = lambda t: jax.tree.map(lambda a: a[i], t, is_leaf=lambda x: isinstance(x, tuple))  # noqa: E731
        return {"input_norm": pick(layers["input_norm"]),
                "post_attn_norm": pick(layers["post_attn_norm"]),
                "attn": pick(layers[view]), "mlp": pick(layers["mlp"])}

    old_k = jnp.stack([jnp.swapaxes(a, 1, 2) for a in start.k])  # [L, B, S, Hkv, hd]
    old_v = jnp.stack([jnp.swapaxes(a, 1, 2) for a in start.v])

    def old_forward(tokens, view):
        T = tokens.shape[1]
        positions = lengths[:, None] + jnp.arange(T)[None, :]
        x = model.embed(tokens)
        for i in range(c.num_hidden_layers):
            p = layer_params(view, i)
            h = rms_norm(x, p["input_norm"], c.rms_norm_eps)
            q, k, v = project_qkv(p["attn"], h, rope_tables(positions, c.head_dim, c.rope_theta), c)
            if view == "attn":
                kc, vc = old_write(old_k, i, k, positions), old_write(old_v, i, v, positions)
                o = old_causal(q, kc[i], vc[i], positions)
            else:
                split = lambda t: t[:, None]  # noqa: E731
                o = old_block(split(q), old_k[i], old_v[i], split(k), split(v),
                              lengths[:, None])[:, 0]
            x = x + project_out(p["attn"], o, c)
            x = x + mlp(p["mlp"], rms_norm(x, p["post_attn_norm"], c.rms_norm_eps))
        return model.logits(rms_norm(x, model.norm[...], c.rms_norm_eps))

    ar, _ = model(chunk, start)
    np.testing.assert_allclose(np.asarray(ar), np.asarray(old_forward(chunk, "attn")),
                               atol=TOL)
    draft = model.logits(model.diffusion_hidden(chunk, start))
    np.testing.assert_allclose(np.asarray(draft),
                               np.asarray(old_forward(chunk, "diff_attn")), atol=TOL)
