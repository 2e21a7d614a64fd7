"""The CPU attention kernel (:mod:`orthrus_jax.cpu_attention`) against XLA's attention:
its partials, the two views that use it, and the engine's tokens with it on and off."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orthrus_jax import cpu_attention
from orthrus_jax.attention import block_attention, causal_cache_attention

AVX512 = "avx512f" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() \
    else False
pytestmark = pytest.mark.skipif(not (AVX512 and shutil.which("g++")),
                                reason="the kernel needs g++ and an AVX-512 CPU")


def _ref_partials(q, k, v, limit, scale):
    """The partials by XLA's products: o, m, l."""
    N = q.shape[0]
    s = jnp.einsum("nrd,nsd->nrs", q, k[:N]) * scale
    visible = jnp.arange(k.shape[1])[None, None] < limit[..., None]
    s = jnp.where(visible, s, -1e30)
    m = jnp.max(s, axis=-1)
    p = jnp.where(visible, jnp.exp(s - m[..., None]), 0.0)
    return jnp.einsum("nrs,nsd->nrd", p, v[:N]), jnp.where(visible.any(-1), m, -1e30), p.sum(-1)


def test_the_kernel_builds_here_and_leaves_floating_point_as_it_was():
    assert cpu_attention.available()
    assert cpu_attention.library_path().is_file()
    # loading it must not flush subnormals to zero in this process (a library linked with
    # -ffast-math would)
    assert (np.array([5e-324]) * 1.0)[0] > 0 and np.float32(1e-40) * np.float32(1.0) > 0


# Fewer than 8 rows: scores key by key; 8 or more: as a product with keys transposed 16 at a
# time (the last 16 copied where the cache ends inside them).
@pytest.mark.parametrize(("D", "S", "R", "M"), [(64, 700, 3, 6), (32, 300, 18, 4),
                                                  (128, 513, 5, 2), (64, 2050, 21, 2),
                                                  (256, 40, 8, 2), (64, 256, 7, 2)])
def test_partials_equal_xlas_at_limits_straddling_the_chunks(D, S, R, M):
    rng = np.random.default_rng(D + S)
    N = M // 2 if M > 2 else M  # fewer query groups than the cache holds: the rest unread
    q = jnp.asarray(rng.standard_normal((N, R, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((M, S, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((M, S, D)), jnp.float32)
    edges = [e for e in (0, 1, 15, 255, 256, 257, 511, 512, S - 1, S) if e <= S]
    limit = jnp.asarray(rng.choice(edges, (N, R)), jnp.int32)
    got = jax.jit(lambda *a: cpu_attention.prefix_partials(*a, D**-0.5))(q, k, v, limit)
    want = _ref_partials(q, k, v, limit, D**-0.5)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5)
    empty = np.asarray(limit) == 0  # nothing visible: no weight at all
    assert (np.asarray(got[2])[empty] == 0).all() and (np.asarray(got[1])[empty] == -1e30).all()


def test_both_views_equal_xlas():
    rng = np.random.default_rng(3)
    B, Hq, Hkv, hd, S, T = 2, 6, 2, 64, 600, 4
    k = jnp.asarray(rng.standard_normal((B + 1, Hkv, S, hd)), jnp.float32)  # a spare row
    v = jnp.asarray(rng.standard_normal((B + 1, Hkv, S, hd)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((B, T, Hq, hd)), jnp.float32)
    positions = jnp.asarray([[300, 301, 302, 303], [5, 6, 7, 8]], jnp.int32)
    a = causal_cache_attention(q, k, v, positions, kernel=True)
    b = causal_cache_attention(q, k, v, positions)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)

    m, K = 2, 3
    qb = jnp.asarray(rng.standard_normal((B, m, K, Hq, hd)), jnp.float32)
    kb = jnp.asarray(rng.standard_normal((B, m, K, Hkv, hd)), jnp.float32)
    vb = jnp.asarray(rng.standard_normal((B, m, K, Hkv, hd)), jnp.float32)
    prefix = jnp.asarray([[0, 257], [512, 600]], jnp.int32)  # an empty prefix too
    mask = jnp.asarray(rng.random((B, m, K, K)) < 0.6) | jnp.eye(K, dtype=bool)
    for block_mask in (None, mask):
        a = block_attention(qb, k, v, kb, vb, prefix, block_mask, kernel=True)
        b = block_attention(qb, k, v, kb, vb, prefix, block_mask)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_the_engine_decodes_the_same_tokens_with_and_without_it():
    from infer.engine import Generator
    from tests.infer.test_decode import _model, _prompts, _summary

    on, off = (Generator(_model("agree"), attention_kernel=flag) for flag in (None, False))
    assert on.model.attention_kernel and not off.model.attention_kernel
    prompts = _prompts(seed=41, n=4)
    for mode, kwargs in (("ar", {}), ("orthrus", {}), ("orthrus", {"tree_budget": 5})):
        a = on.generate(prompts, mode=mode, batch_size=2, max_new_tokens=24, eos_ids=[],
                        **kwargs)
        b = off.generate(prompts, mode=mode, batch_size=2, max_new_tokens=24, eos_ids=[],
                         **kwargs)
        assert _summary(a) == _summary(b), (mode, kwargs)


def test_without_a_compiler_attention_stays_xlas(tmp_path):
    env = dict(os.environ, CXX="false", ORTHRUS_KERNELS=str(tmp_path / "kernels"))
    code = ("from orthrus_jax import cpu_attention as c; print(c.available())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "False"
    assert "the CPU attention kernel is unavailable, attention stays XLA's" in out.stderr
    assert not any(tmp_path.glob("kernels/*.so"))  # nothing half-built left behind
