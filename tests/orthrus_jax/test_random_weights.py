"""Random-weight models built a tensor at a time: the model's tree, shapes, dtypes and
shardings, values in the recipe's scale, both layer forms equal, and the layer-form change
in place."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from infer.passes import ar_pass
from orthrus_jax.cache import init_cache
from orthrus_jax.checkpoint import abstract_model
from orthrus_jax.config import ModelConfig
from orthrus_jax.model import set_layer_form
from orthrus_jax.random_weights import abstract_params, fan_in, random_model
from orthrus_jax.sharding import make_mesh, param_shardings

CONFIG = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16, block_size=4, mask_token_id=3, max_position_embeddings=256)


def _leaves(model):
    return jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_tree_is_the_model_of_the_config(dtype):
    config = CONFIG.replace(param_dtype=dtype, dtype=dtype)
    expected = {jax.tree_util.keystr(p): (s.shape, s.dtype) for p, s in
                _leaves(abstract_model(config))}
    stacked = random_model(config, per_layer=False)
    assert {jax.tree_util.keystr(p): (a.shape, a.dtype) for p, a in _leaves(stacked)} \
        == expected
    per_layer = random_model(config)
    assert per_layer.per_layer and not stacked.per_layer
    gate = per_layer.layers.mlp.gate_proj.get_value()
    assert len(gate) == 3 and gate[0].shape == (64, 128) and gate[0].dtype == jnp.dtype(dtype)
    abstract = abstract_params(config, per_layer=True)
    assert isinstance(abstract.layers.mlp.gate_proj.get_value()[0], jax.ShapeDtypeStruct)


def test_values_follow_the_recipe_and_the_forms_agree():
    per_layer, stacked = random_model(CONFIG, seed=3), random_model(CONFIG, seed=3,
                                                                       per_layer=False)
    other = random_model(CONFIG, seed=4)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        ar = getattr(per_layer.layers.attn, name).get_value()
        diff = getattr(per_layer.layers.diff_attn, name).get_value()
        for layer in range(3):  # the diffusion view starts as the AR view
            np.testing.assert_array_equal(np.asarray(ar[layer]), np.asarray(diff[layer]))
        np.testing.assert_array_equal(np.asarray(jnp.stack(ar)),
                                      np.asarray(getattr(stacked.layers.attn, name)[...]))
    q = per_layer.layers.attn.q_proj.get_value()
    assert not np.array_equal(np.asarray(q[0]), np.asarray(q[1]))  # layers differ
    assert not np.array_equal(np.asarray(q[0]),
                              np.asarray(other.layers.attn.q_proj.get_value()[0]))
    down = np.asarray(jnp.stack(per_layer.layers.mlp.down_proj.get_value()))
    assert abs(down.std() - fan_in(CONFIG, "down_proj") ** -0.5) < 0.1 * 128**-0.5
    assert abs(np.asarray(per_layer.embed_tokens[...]).std() - 1.0) < 0.05
    assert np.all(np.asarray(per_layer.norm[...]) == 1.0)
    assert all(np.all(np.asarray(a) == 1.0) for a in per_layer.layers.input_norm.get_value())
    with pytest.raises(ValueError, match="parameter mystery_proj"):
        fan_in(CONFIG, "mystery_proj")


def test_a_model_on_a_mesh_has_the_rules_shardings():
    mesh = make_mesh("data=4,tensor=2")
    model = random_model(CONFIG, per_layer=False, mesh=mesh)
    expected = jax.tree.leaves(param_shardings(abstract_model(CONFIG), mesh))
    for (path, a), sharding in zip(_leaves(model), expected, strict=True):
        assert isinstance(a.sharding, NamedSharding)
        assert a.sharding.is_equivalent_to(sharding, a.ndim), jax.tree_util.keystr(path)
    per_layer = random_model(CONFIG, mesh=mesh)
    q = per_layer.layers.attn.q_proj.get_value()[0]
    assert tuple(q.sharding.spec) == tuple(model.layers.attn.q_proj[...].sharding.spec)[1:]


def test_the_layer_form_changes_in_place_and_decodes_the_same():
    model = random_model(CONFIG)
    cache = init_cache(CONFIG, 1, 8, per_layer=True)
    tokens = jnp.asarray([[5]], jnp.int32)
    before = np.asarray(ar_pass(model, tokens, cache.k, cache.v, cache.lengths)[0])
    assert set_layer_form(model, False) is model and not model.per_layer
    assert model.layers.mlp.up_proj[...].shape == (3, 64, 128)
    stacked_cache = init_cache(CONFIG, 1, 8)
    scanned = np.asarray(ar_pass(model, tokens, stacked_cache.k, stacked_cache.v,
                                 stacked_cache.lengths)[0])
    np.testing.assert_allclose(scanned, before, rtol=1e-5, atol=1e-5)
    set_layer_form(model, True)
    cache = init_cache(CONFIG, 1, 8, per_layer=True)
    np.testing.assert_array_equal(
        np.asarray(ar_pass(model, tokens, cache.k, cache.v, cache.lengths)[0]), before)
