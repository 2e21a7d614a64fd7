"""The decoder's ``[out, in]`` projection form (``set_out_in``): the same numbers as the
training form, in every pass, through every conversion that meets it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from orthrus_jax.cache import init_cache
from orthrus_jax.checkpoint import load_model, save_model
from orthrus_jax.layers import PROJECTIONS, project
from orthrus_jax.model import (
    copy_diffusion,
    decoding_form,
    prefill,
    set_layer_form,
    set_out_in,
    unstack_layers,
)
from orthrus_jax.random_weights import abstract_params
from orthrus_jax.sharding import make_mesh
from tests.hf_reference import hf_model, to_orthrus

TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return to_orthrus(hf_model("qwen3", seed=5, tied=False), block_size=4)


@pytest.mark.parametrize("lead", [(1, 1), (2, 1), (1, 3), (2, 4), (3, 3), (4, 10)])
@pytest.mark.parametrize("n_in", [1, 2])
def test_a_projection_is_the_same_product_either_way_round(lead, n_in):
    rng = np.random.default_rng(n_in)
    ins, outs = (12,) if n_in == 1 else (3, 4), (5, 6)
    x = jnp.asarray(rng.standard_normal((*lead, *ins)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((*ins, *outs)), jnp.float32)
    w_out_in = jnp.transpose(w, (*range(n_in, w.ndim), *range(n_in)))
    want = project(x, w, n_in)
    got = project(x, w_out_in, n_in, weights_out_in=True)
    assert got.shape == want.shape == (*lead, *outs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=TOL)
    # 2 to 8 rows take the weight-first product behind barriers; others the plain one
    jaxpr = str(jax.make_jaxpr(lambda a, b: project(a, b, n_in, True))(x, w_out_in))
    rows = int(np.prod(lead))
    assert ("optimization_barrier" in jaxpr) == (1 < rows <= 8)


def test_the_out_in_form_computes_what_the_training_form_computes(model):
    """Prefill in chunks of 4 rows (weight first) and 12 (plain), the cache it writes,
    and the diffusion pass, against the stacked model."""
    held = decoding_form(model, out_in=True)
    q = held.layers.attn.q_proj.get_value()[1]
    np.testing.assert_array_equal(  # [D, Hq, hd] held as [Hq, hd, D]
        np.asarray(q), np.transpose(np.asarray(model.layers.attn.q_proj[1]), (1, 2, 0)))
    o = held.layers.diff_attn.o_proj.get_value()[0]
    np.testing.assert_array_equal(  # [Hq, hd, D] held as [D, Hq, hd]
        np.asarray(o), np.transpose(np.asarray(model.layers.diff_attn.o_proj[0]), (2, 0, 1)))
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, 512, (2, 24)))
    block = jnp.asarray(rng.integers(0, 512, (2, 4)))

    def run(m, chunk):
        cache = init_cache(m.config, 2, 32, per_layer=m.per_layer)
        logits, cache = prefill(m, tokens, cache, jnp.array([24, 13]), chunk_size=chunk)
        k = jnp.stack(cache.k) if cache.per_layer else cache.k
        return logits, k, m.logits(m.diffusion_hidden(block, cache))

    for chunk in (2, 12):  # 4 and 24 rows per pass at batch 2
        want = jax.jit(run, static_argnums=1)(model, chunk)
        got = jax.jit(run, static_argnums=1)(held, chunk)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_the_form_round_trips_and_needs_per_layer_weights(model):
    per_layer = unstack_layers(model)
    before = [np.asarray(a) for a in per_layer.layers.mlp.down_proj.get_value()]
    set_out_in(per_layer, True)
    assert per_layer.out_in and per_layer.layers.mlp.down_proj.get_value()[0].shape == (
        model.config.hidden_size, model.config.intermediate_size)
    assert set_out_in(per_layer, True) is per_layer  # already held that way
    set_out_in(per_layer, False)
    assert not per_layer.out_in
    for a, b in zip(per_layer.layers.mlp.down_proj.get_value(), before, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    with pytest.raises(ValueError, match="needs per-layer weights"):
        set_out_in(model, True)
    # back to training's stacks: the projections return to [in, out] first
    stacked = set_layer_form(decoding_form(model, out_in=True), per_layer=False)
    assert not stacked.out_in and not stacked.per_layer
    np.testing.assert_array_equal(np.asarray(stacked.layers.attn.k_proj[...]),
                                  np.asarray(model.layers.attn.k_proj[...]))


def test_diffusion_tensors_move_between_forms(model):
    """Training's stacked head into an out-in decoder, and back out of it."""
    other = to_orthrus(hf_model("qwen3", seed=6, tied=False), block_size=4)
    target = decoding_form(other, out_in=True)
    copy_diffusion(model, target)
    for name, n_in in PROJECTIONS.items():
        if name not in ("q_proj", "k_proj", "v_proj", "o_proj"):
            continue
        got = getattr(target.layers.diff_attn, name).get_value()[1]
        want = np.asarray(getattr(model.layers.diff_attn, name)[1])
        np.testing.assert_array_equal(
            np.asarray(got), np.transpose(want, (*range(n_in, want.ndim), *range(n_in))))
    back = to_orthrus(hf_model("qwen3", seed=6, tied=False), block_size=4)
    copy_diffusion(target, back)
    np.testing.assert_array_equal(np.asarray(back.layers.diff_attn.o_proj[...]),
                                  np.asarray(model.layers.diff_attn.o_proj[...]))


def test_an_out_in_model_saves_in_the_training_form(model, tmp_path):
    save_model(decoding_form(model, out_in=True), tmp_path)
    loaded = load_model(tmp_path)
    for kind in ("attn", "diff_attn", "mlp"):
        for name in PROJECTIONS:
            if hasattr(getattr(model.layers, kind), name):
                np.testing.assert_array_equal(
                    np.asarray(getattr(getattr(loaded.layers, kind), name)[...]),
                    np.asarray(getattr(getattr(model.layers, kind), name)[...]))


def test_the_decoding_form_is_out_in_on_cpu_and_on_abstract_models(model):
    assert decoding_form(model).out_in  # this suite runs on CPU
    assert not decoding_form(model, out_in=False).out_in
    abstract = decoding_form(abstract_params(model.config, per_layer=True))
    up = abstract.layers.mlp.up_proj.get_value()[0]
    assert isinstance(up, jax.ShapeDtypeStruct)
    assert up.shape == (model.config.intermediate_size, model.config.hidden_size)


def test_a_sharded_model_keeps_its_shards_with_the_axes_moved(tmp_path):
    model = to_orthrus(hf_model("qwen3", tied=False))
    save_model(model, tmp_path)
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    sharded = set_out_in(load_model(tmp_path, mesh=mesh, per_layer=True), True)
    # per layer [D, Hq, hd] on ("fsdp", "tensor", None) -> [Hq, hd, D]
    assert sharded.layers.attn.q_proj.get_value()[0].sharding.spec == P("tensor", None, "fsdp")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (4, 2)))  # 8 rows
    fwd = jax.jit(lambda m, t, c: m(t, c))
    want, _ = fwd(model, tokens, init_cache(model.config, 4, 16))
    got, _ = fwd(sharded, tokens, init_cache(sharded.config, 4, 16, mesh=mesh, per_layer=True))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)
