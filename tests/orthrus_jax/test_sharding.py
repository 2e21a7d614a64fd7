"""Logical-axis rules, and a model restored straight onto a mesh of 8 CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from orthrus_jax.cache import init_cache
from orthrus_jax.checkpoint import load_model, save_model
from orthrus_jax.model import split_trainable, unstack_layers
from orthrus_jax.sharding import logical_to_spec, make_mesh, parse_mesh_shape
from tests.hf_reference import hf_model, to_orthrus


def test_rules_map_logical_axes_and_reject_reuse():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert logical_to_spec(("layers", "embed", "q_heads", "head_dim"), mesh) == \
        P(None, "fsdp", "tensor", None)
    assert logical_to_spec(("batch", "seq"), mesh) == P(("data", "fsdp"), None)
    with pytest.raises(ValueError, match="mesh axis 'tensor' is used by logical axes 'q_heads'"):
        logical_to_spec(("q_heads", "mlp"), mesh, name="w")
    with pytest.raises(ValueError, match=r"w: dimension 1 \('kv_heads', size 3\) is not divisible"):
        logical_to_spec(("embed", "kv_heads"), mesh, shape=(64, 3), name="w")


def test_mesh_construction_and_parsing():
    assert parse_mesh_shape("data=2,tensor=4") == {"data": 2, "fsdp": 1, "tensor": 4}
    assert dict(make_mesh("fsdp=-1,tensor=2").shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert make_mesh({"data": 3, "tensor": 2}).devices.size == 6  # the first 6 of 8
    with pytest.raises(ValueError, match="needs 12 devices, but 8"):
        make_mesh({"data": 3, "tensor": 4})
    with pytest.raises(ValueError, match="expected AXIS=N"):
        parse_mesh_shape("model=2")


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 4, "tensor": 2}, {"data": 2, "tensor": 2,
                                                                    "fsdp": 2}])
def test_sharded_load_gives_unsharded_logits(tmp_path, mesh_shape):
    model = to_orthrus(hf_model("qwen3", tied=False))
    save_model(model, tmp_path)
    mesh = make_mesh(mesh_shape)
    sharded = load_model(tmp_path, mesh=mesh)
    assert sharded.layers.attn.q_proj[...].sharding.spec == P(None, "fsdp", "tensor", None)
    assert sharded.layers.diff_attn.k_proj[...].sharding.spec == P(None, "fsdp", "tensor", None)
    assert sharded.embed_tokens[...].sharding.spec == P("tensor", "fsdp")
    tokens = np.random.default_rng(0).integers(0, 512, (4, 9))  # batch over data x fsdp
    fwd = jax.jit(lambda m, t, c: m(t, c))
    ref, _ = fwd(model, jnp.asarray(tokens), init_cache(model.config, 4, 16))
    cache = init_cache(sharded.config, 4, 16, mesh=mesh)
    assert cache.k.sharding.spec == P(None, ("data", "fsdp"), "tensor", None, None)
    out, cache = fwd(sharded, jnp.asarray(tokens), cache)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
    # The decoding form: per-layer weights and per-layer K/V, each sharded like one layer.
    per_layer = init_cache(sharded.config, 4, 16, mesh=mesh, per_layer=True)
    assert per_layer.k[0].sharding.spec == P(("data", "fsdp"), "tensor", None, None)
    out, _ = fwd(unstack_layers(sharded), jnp.asarray(tokens), per_layer)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_split_separates_diffusion_subtree_by_type(tmp_path):
    model = to_orthrus(hf_model("qwen3", tied=True))
    _, diffusion, backbone = split_trainable(model)
    diff_names = {".".join(map(str, p)) for p in nnx.to_flat_state(diffusion).paths}
    assert diff_names == {f"layers.diff_attn.{n}" for n in
                          ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")}
    back_names = {".".join(map(str, p)) for p in nnx.to_flat_state(backbone).paths}
    assert not any("diff" in n for n in back_names) and "embed_tokens" in back_names
    assert "lm_head" not in back_names  # tied
