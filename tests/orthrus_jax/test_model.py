"""The backbone against transformers, and the KV cache paths against one full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orthrus_jax.cache import init_cache
from orthrus_jax.model import is_unstacked, prefill, unstack_layers
from tests.hf_reference import hf_logits, hf_model, to_orthrus

TOL = 1e-4
step = jax.jit(lambda m, t, c: m(t, c))


def full_logits(model, tokens: np.ndarray) -> np.ndarray:
    cache = init_cache(model.config, tokens.shape[0], tokens.shape[1])
    logits, _ = step(model, jnp.asarray(tokens), cache)
    return np.asarray(logits)


VARIANTS = [("qwen3", False), ("qwen3", True), ("llama", False), ("llama", True)]
_PAIRS: dict = {}


def _pair(variant):
    if variant not in _PAIRS:
        hf = hf_model(*variant)
        _PAIRS[variant] = hf, to_orthrus(hf)
    return _PAIRS[variant]


@pytest.fixture(params=VARIANTS, ids=lambda p: f"{p[0]}-tied{p[1]}")
def pair(request):
    """Every family variant, tied and untied: for the parity tests."""
    return _pair(request.param)


@pytest.fixture(params=[VARIANTS[0], VARIANTS[3]], ids=lambda p: f"{p[0]}-tied{p[1]}")
def cache_pair(request):
    """An untied Qwen3 and a tied Llama: for the cache-path tests."""
    return _pair(request.param)


@pytest.mark.parametrize("length", [1, 5, 17, 64])
def test_logits_match_transformers(pair, length):
    hf, model = pair
    tokens = np.random.default_rng(length).integers(0, 512, (2, length))
    diff = np.abs(full_logits(model, tokens) - hf_logits(hf, tokens)).max()
    assert diff <= TOL, diff


def test_qwen2_biases_match_transformers():
    hf = hf_model("qwen2", tied=False)
    model = to_orthrus(hf)
    assert model.config.qkv_bias and not model.config.o_bias
    tokens = np.random.default_rng(0).integers(0, 512, (1, 23))
    assert np.abs(full_logits(model, tokens) - hf_logits(hf, tokens)).max() <= TOL


def test_llama_attention_bias_matches_transformers():
    hf = hf_model("llama", tied=False, attention_bias=True)
    model = to_orthrus(hf)
    assert model.config.qkv_bias and model.config.o_bias
    tokens = np.random.default_rng(1).integers(0, 512, (1, 9))
    assert np.abs(full_logits(model, tokens) - hf_logits(hf, tokens)).max() <= TOL


@pytest.mark.slow
def test_bfloat16_compute_stays_close_to_float32(pair):
    hf, model32 = pair
    model16 = to_orthrus(hf, dtype="bfloat16")
    assert model16.embed_tokens[...].dtype == jnp.bfloat16
    tokens = np.random.default_rng(2).integers(0, 512, (1, 12))
    cache = init_cache(model16.config, 1, 12)
    assert cache.k.dtype == jnp.bfloat16
    logits16, _ = model16(jnp.asarray(tokens), cache)
    assert logits16.dtype == jnp.float32
    ref = full_logits(model32, tokens)
    err = np.abs(np.asarray(logits16) - ref).max()
    assert 0 < err < 0.05 * np.abs(ref).max()


def test_prefill_then_single_steps_equals_full_forward(cache_pair):
    _, model = cache_pair
    P, T = 11, 6
    tokens = np.random.default_rng(3).integers(0, 512, (2, P + T))
    ref = full_logits(model, tokens)
    cache = init_cache(model.config, 2, 32)
    logits, cache = step(model, jnp.asarray(tokens[:, :P]), cache)
    np.testing.assert_allclose(np.asarray(logits), ref[:, :P], atol=TOL)
    for t in range(P, P + T):
        logits, cache = step(model, jnp.asarray(tokens[:, t:t + 1]), cache)
        np.testing.assert_allclose(np.asarray(logits[:, 0]), ref[:, t], atol=TOL)
    assert list(np.asarray(cache.lengths)) == [P + T, P + T]


@pytest.mark.slow
def test_chunked_prefill_equals_one_shot(cache_pair):
    _, model = cache_pair
    tokens = np.random.default_rng(4).integers(0, 512, (2, 24))
    lengths = jnp.array([24, 19])
    one_logits, one_cache = prefill(model, jnp.asarray(tokens), init_cache(model.config, 2, 40),
                                    lengths)
    chunked = jax.jit(lambda m, t, c, n: prefill(m, t, c, n, chunk_size=8))
    ch_logits, ch_cache = chunked(model, jnp.asarray(tokens), init_cache(model.config, 2, 40),
                                  lengths)
    np.testing.assert_allclose(np.asarray(ch_logits), np.asarray(one_logits), atol=TOL)
    assert list(np.asarray(ch_cache.lengths)) == [24, 19]
    for row, n in enumerate([24, 19]):
        np.testing.assert_allclose(np.asarray(ch_cache.k[:, row, :, :n]),
                                   np.asarray(one_cache.k[:, row, :, :n]), atol=TOL)
        # last-token logits are those of a full forward over the row alone
        ref = full_logits(model, tokens[row:row + 1, :n])[0, -1]
        np.testing.assert_allclose(np.asarray(ch_logits[row]), ref, atol=TOL)


@pytest.mark.slow
def test_rows_of_different_lengths_match_each_row_alone(cache_pair):
    _, model = cache_pair
    rng = np.random.default_rng(5)
    lengths = [13, 4]
    tokens = np.zeros((2, 16), np.int64)
    for row, n in enumerate(lengths):
        tokens[row, :n] = rng.integers(0, 512, n)
    cache = init_cache(model.config, 2, 32)
    last, cache = prefill(model, jnp.asarray(tokens), cache, jnp.array(lengths), chunk_size=8)
    nxt = rng.integers(0, 512, (2, 3))
    step_logits, cache = model(jnp.asarray(nxt), cache)  # each row continues at its own length
    for row, n in enumerate(lengths):
        alone = np.concatenate([tokens[row, :n], nxt[row]])[None]
        ref = full_logits(model, alone)[0]
        np.testing.assert_allclose(np.asarray(last[row]), ref[n - 1], atol=TOL)
        np.testing.assert_allclose(np.asarray(step_logits[row]), ref[n:], atol=TOL)
    assert list(np.asarray(cache.lengths)) == [16, 7]


@pytest.mark.slow
def test_diffusion_pass_reads_the_prefix_and_writes_nothing(cache_pair):
    _, model = cache_pair
    rng = np.random.default_rng(6)
    prefix = rng.integers(0, 512, (2, 9))
    cache = init_cache(model.config, 2, 32)
    _, cache = model(jnp.asarray(prefix), cache, num_valid=jnp.array([9, 5]))
    k_before = np.asarray(cache.k)
    block = rng.integers(0, 512, (2, 4))
    hidden = model.diffusion_hidden(jnp.asarray(block), cache)
    np.testing.assert_array_equal(np.asarray(cache.k), k_before)
    # A one-token block through diffusion weights that equal the AR weights is an AR step.
    one = model.logits(model.diffusion_hidden(jnp.asarray(block[:, :1]), cache))
    for row, n in enumerate([9, 5]):
        seq = np.concatenate([prefix[row, :n], block[row, :1]])[None]
        np.testing.assert_allclose(np.asarray(one[row, 0]), full_logits(model, seq)[0, -1],
                                   atol=TOL)
    # Inside the block attention is bidirectional: a later token changes earlier outputs.
    changed = block.copy()
    changed[:, -1] = (changed[:, -1] + 1) % 512
    hidden2 = model.diffusion_hidden(jnp.asarray(changed), cache)
    assert np.abs(np.asarray(hidden2[:, 0]) - np.asarray(hidden[:, 0])).max() > 1e-4
    # Each row depends only on its own prefix: batched equals row alone.
    for row, n in enumerate([9, 5]):
        c1 = init_cache(model.config, 1, 32)
        _, c1 = model(jnp.asarray(prefix[row:row + 1, :n]), c1)
        alone = model.diffusion_hidden(jnp.asarray(block[row:row + 1]), c1)
        np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(hidden[row]), atol=TOL)


@pytest.mark.slow
def test_many_blocks_at_once_equal_one_block_over_a_prefix_cache(cache_pair):
    """The training form (m blocks over the AR K/V of a whole sequence) gives, for each
    block, what the decoder's one-block pass gives over a cache holding its prefix."""
    _, model = cache_pair
    rng = np.random.default_rng(7)
    L, K = 20, 4
    seq = rng.integers(0, 512, (2, L))
    full = init_cache(model.config, 2, L)
    _, full = step(model, jnp.asarray(seq), full)
    anchors = np.array([[1, 9, 16], [3, 4, 12]])
    blocks = np.full((2, 3, K), 7)
    blocks[:, :, 0] = np.take_along_axis(seq, anchors, 1)
    many = model.diffusion_blocks(jnp.asarray(blocks), jnp.asarray(anchors), full)
    for row in range(2):
        for j, a in enumerate(anchors[row]):
            prefix = init_cache(model.config, 1, L)
            _, prefix = step(model, jnp.asarray(seq[row:row + 1, :a]), prefix)
            one = model.diffusion_hidden(jnp.asarray(blocks[row:row + 1, j]), prefix)
            np.testing.assert_allclose(np.asarray(many[row, j]), np.asarray(one[0]), atol=TOL)


@pytest.mark.slow
def test_unstacked_layers_compute_what_the_stacked_layers_compute(cache_pair):
    """The decoder's per-layer weights (an unrolled loop) against the stacked scan: the
    AR view with its cache writes, and the diffusion view."""
    _, model = cache_pair
    unstacked = unstack_layers(model)
    assert unstack_layers(unstacked) is unstacked
    q = unstacked.layers.diff_attn.q_proj.get_value()
    assert is_unstacked(q) and len(q) == model.config.num_hidden_layers
    np.testing.assert_array_equal(np.asarray(q[1]), np.asarray(model.layers.diff_attn.q_proj[1]))
    assert not is_unstacked(model.layers.diff_attn.q_proj.get_value())  # model untouched

    rng = np.random.default_rng(8)
    tokens = jnp.asarray(rng.integers(0, 512, (2, 12)))
    block = jnp.asarray(rng.integers(0, 512, (2, 4)))

    @jax.jit
    def run(m):
        cache = init_cache(m.config, 2, 32)
        logits, cache = prefill(m, tokens, cache, jnp.array([12, 7]), chunk_size=4)
        return logits, cache.k, cache.lengths, m.logits(m.diffusion_hidden(block, cache))

    for a, b in zip(run(model), run(unstacked), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=TOL)
