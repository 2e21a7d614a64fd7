"""The memory planner against real arrays: weights, cache, optimizer state and per-device
shards on the 8 simulated CPU devices; activations against XLA's compiled temporaries
(float32 on CPU: in bfloat16 the CPU backend adds float32 copies of the weights)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import infer.decode
from infer.buckets import DecodeSpec, cache_len
from infer.decode import DecodeInputs, row_keys, run, start
from infer.engine import Generator
from infer.sampling import SamplingParams
from orthrus_jax.cache import init_cache
from orthrus_jax.checkpoint import abstract_model
from orthrus_jax.config import ModelConfig
from orthrus_jax.layers import DiffusionParam
from orthrus_jax.memory import (
    decode_cache_len,
    device_bytes,
    format_bytes,
    format_peak,
    mesh_shape,
    parse_bytes,
    peak_memory,
    plan_decode,
    plan_train,
    tree_bytes,
)
from orthrus_jax.model import OrthrusLM, unstack_layers
from orthrus_jax.sharding import make_mesh, shard_model
from train.objective import training_loss
from train.step import TrainConfig, Trainer

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=4096, block_size=8, mask_token_id=3)


def tiny(dtype: str = "float32", **changes) -> ModelConfig:
    return ModelConfig(**TINY | changes, dtype=dtype, param_dtype=dtype)


def build(config: ModelConfig) -> OrthrusLM:
    """A model of ``config`` with zero weights (values do not matter to memory; building
    from the abstract model compiles nothing)."""
    model = abstract_model(config)
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), state))


def test_tree_bytes_of_states_modules_and_shape_structs():
    model = build(tiny("bfloat16", tie_word_embeddings=True))
    state = nnx.state(model)
    expected = sum(a.nbytes for a in jax.tree.leaves(state))
    assert tree_bytes(state) == tree_bytes(model) == expected
    assert tree_bytes(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                   state)) == expected
    assert tree_bytes(unstack_layers(model)) == expected  # per-layer form: same bytes
    assert tree_bytes({"x": np.zeros((3, 5), np.int32), "n": None, "s": 1.5}) == 60


@pytest.mark.parametrize(("dtype", "tied"), [("float32", False), ("bfloat16", True)])
def test_decode_plan_weights_and_cache_equal_the_real_arrays(dtype, tied):
    config = tiny(tie_word_embeddings=tied)
    plan = plan_decode(config, dtype=dtype, batch=3, context=50)
    assert plan.details["cache_len"] == 256  # 50 + K=8 -> the least cache length
    model = unstack_layers(build(tiny(dtype, tie_word_embeddings=tied)))
    assert plan.per_device["weights"] == tree_bytes(model)
    cache = init_cache(model.config, 3, plan.details["cache_len"])
    assert plan.per_device["cache"] == tree_bytes(cache)
    assert plan.total_bytes == sum(plan.per_device.values())


def test_decode_plan_with_a_compute_dtype_counts_what_the_engine_holds():
    """bfloat16 weights with float32 compute (the engine's ``compute_dtype``): weights as
    bfloat16, the cache as float32, plus the LM head converted to float32."""
    config = tiny(tie_word_embeddings=True)
    plan = plan_decode(config, dtype="bfloat16", compute_dtype="float32", batch=3, context=50)
    model = unstack_layers(build(tiny(tie_word_embeddings=True).replace(param_dtype="bfloat16")))
    assert model.config.dtype == "float32" and model.config.param_dtype == "bfloat16"
    assert plan.per_device["weights"] == tree_bytes(model)
    cache = init_cache(model.config, 3, plan.details["cache_len"])
    assert cache.k.dtype == jnp.float32 and plan.per_device["cache"] == tree_bytes(cache)
    terms = plan.details["activation_terms"]
    assert terms["converted_weights"] == config.vocab_size * config.hidden_size * 4
    plain = plan_decode(config, dtype="bfloat16", batch=3, context=50)
    assert plain.details["activation_terms"]["converted_weights"] == 0
    assert plain.per_device["weights"] == plan.per_device["weights"]
    lengths = 3 * 4  # int32 [B]
    assert plan.per_device["cache"] - lengths == 2 * (plain.per_device["cache"] - lengths)
    assert plan.details["compute_dtype"] == "float32" == plan_decode(
        config, dtype="float32", batch=3, context=50).details["compute_dtype"]


def test_train_plan_matches_the_trainer_on_an_8_device_mesh():
    config = tiny("bfloat16", tie_word_embeddings=True)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    plan = plan_train(config, dtype="bfloat16", batch=4, seq_len=64, anchors_per_seq=4,
                      block_size=8, mesh=mesh)
    trainer = Trainer(build(config), TrainConfig(total_steps=2), mesh)
    state = trainer.init_state()
    for device in mesh.devices.flat:
        assert device_bytes(trainer.backbone, device) == plan.per_device["weights"]
        assert device_bytes(state.diffusion, device) == plan.per_device["trainable"]
        # AdamW's two moments, plus a few replicated int32 step counters
        assert 0 <= device_bytes(state.opt_state, device) - plan.per_device["optimizer"] <= 16
    assert plan.per_device["gradients"] == plan.per_device["trainable"]
    cache = init_cache(config, 4, 64, mesh=mesh)
    assert device_bytes(cache, mesh.devices.flat[0]) == plan.per_device["cache"]
    assert plan.details["unsharded_weights"] == tree_bytes(trainer.backbone)


@pytest.mark.parametrize("mesh_shape_", [{"fsdp": 4, "tensor": 2}, {"data": 4, "tensor": 2}])
def test_per_device_decode_bytes_equal_the_shards_of_a_sharded_model(mesh_shape_):
    config = tiny()
    mesh = make_mesh(mesh_shape_)
    plan = plan_decode(config, dtype="float32", batch=4, context=100, mesh=mesh)
    unsharded = plan_decode(config, dtype="float32", batch=4, context=100)
    model = unstack_layers(shard_model(build(config), mesh))
    cache = init_cache(config, 4, plan.details["cache_len"], mesh=mesh)
    for device in mesh.devices.flat:
        assert device_bytes(model, device) == plan.per_device["weights"]
        assert device_bytes(cache, device) == plan.per_device["cache"]
    assert plan.per_device["weights"] < unsharded.per_device["weights"]
    assert plan.details["unsharded_weights"] == unsharded.per_device["weights"]
    # the same plan from a mesh that needs no devices
    assert plan_decode(config, dtype="float32", batch=4, context=100,
                       mesh=",".join(f"{a}={n}" for a, n in mesh_shape_.items())) == plan


def test_uneven_sharding_is_refused_as_placing_would_be():
    with pytest.raises(ValueError, match=r"\('kv_heads', size 2\) is not divisible by 4"):
        plan_decode(tiny(), dtype="float32", batch=1, context=10, mesh={"tensor": 4})
    with pytest.raises(ValueError, match="sizes >= 1"):
        mesh_shape("data=-1")
    with pytest.raises(ValueError, match="leaves no room"):
        plan_decode(tiny(), dtype="float32", batch=1, context=100, max_len=64)


def test_cache_length_is_the_engines():
    config = tiny()
    gen = Generator(build(config), max_len=1024, chunk_size=32)
    for prompt, new in ((5, 3), (20, 100), (33, 8), (100, 300), (300, 600), (900, 200)):
        assert decode_cache_len(config, prompt, max_new_tokens=new, max_len=1024) \
            == gen.batch_shape([[0] * prompt], new)[1] == cache_len(prompt, new, 1024)
    assert gen.batch_shape([[0] * 33], 8) == (64, 256)  # two prefill chunks, the least cache
    # a prompt bucket past the cache: 300 tokens pad to 10 chunks, the cache holds 319
    assert gen.batch_shape([[0] * 300], 20) == (320, 320)
    assert gen.batch_shape([[0] * 290], 20) == (320, 320)
    assert gen.batch_shape([[0] * 270], 10) == (288, 288)
    assert gen.batch_shape([[0] * 600], 500) == (608, 1024)  # capped at the engine's
    assert decode_cache_len(config, 248) == 256 and decode_cache_len(config, 249) == 288


# ---------------------------------------------------------------------- XLA's view
def xla_decode_temp(c: ModelConfig, plan) -> int:
    """XLA's temporaries (one device) of the larger of the engine's two greedy programs,
    ``start`` (one prefill chunk) and ``run`` (the decode loop, state donated), compiled
    on abstract per-layer weights at the plan's cache length."""
    batch, K = plan.details["batch"], c.block_size
    cache_len, prefill = plan.details["cache_len"], plan.details["prefill_tokens"]
    graphdef, state = nnx.split(abstract_model(c))
    state["layers"] = jax.tree.map(
        lambda var: var.replace(value=tuple(
            jax.ShapeDtypeStruct(var.get_value().shape[1:], var.get_value().dtype)
            for _ in range(c.num_hidden_layers))),
        state["layers"], is_leaf=lambda x: isinstance(x, nnx.Variable))
    model = nnx.merge(graphdef, state)
    inputs = DecodeInputs(jnp.zeros((batch,), jnp.int32), jnp.zeros((8,), jnp.int32),
                          SamplingParams.make(1.0))
    prompts = jax.ShapeDtypeStruct((batch, prefill), jnp.int32)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
    keys = jax.eval_shape(lambda: row_keys(jax.random.key(0), jnp.arange(batch)))
    spec = DecodeSpec(mode="orthrus", blocks=(K,), greedy=True, batch=batch,
                      prompt_len=prefill, out_len=cache_len, max_len=cache_len, n_eos=8,
                      max_block=K)
    start_fn = jax.jit(lambda m, p, n, i, k: start(m, p, n, i, k, spec))
    start_temp = start_fn.lower(model, prompts, lengths, inputs, keys).compile() \
        .memory_analysis().temp_size_in_bytes
    state = jax.eval_shape(start_fn, model, prompts, lengths, inputs, keys)
    run_fn = jax.jit(lambda m, st, i, n: run(m, st, i, n, spec), donate_argnums=1)
    run_temp = run_fn.lower(model, state, inputs, jnp.int32(0)).compile() \
        .memory_analysis().temp_size_in_bytes
    return int(max(start_temp, run_temp))


def xla_train_temp(c: ModelConfig, batch: int, seq_len: int, anchors: int, remat: bool,
                   loss_chunk: int = 16) -> int:
    """XLA's temporaries (one device) of the gradient of the training loss with respect
    to the float32 diffusion tensors (the train step without its optimizer update)."""
    graphdef, diffusion, backbone = nnx.split(abstract_model(c), DiffusionParam, ...)
    diffusion = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), diffusion)
    backbone = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), backbone)
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    anchor_ids = jax.ShapeDtypeStruct((batch, anchors), jnp.int32)
    mask = jax.ShapeDtypeStruct((batch, anchors), jnp.bool_)

    def grads(diff, frozen, t, a, ok):
        def loss(d):
            return training_loss(nnx.merge(graphdef, d, frozen), t, a, ok,
                                 loss_chunk=loss_chunk, remat=remat)[0]
        return jax.grad(loss)(diff)

    return int(jax.jit(grads).lower(diffusion, backbone, tokens, anchor_ids, mask).compile()
               .memory_analysis().temp_size_in_bytes)


# Analytic activations within this factor of XLA's temporaries (float32 on CPU; in
# bfloat16 the CPU backend adds float32 copies of the weights, a GPU does not). The
# estimate counts two float32 score arrays where XLA sometimes fuses the softmax into one.
TOLERANCE = (0.8, 1.6)
# Decoding scores: XLA keeps the float32 scores and their exponentials for some shapes
# and fuses the exponentials into the product with V for others (then the estimate is
# about 2x); the planner errs high.
DECODE_TOLERANCE = (0.8, 2.2)


@pytest.mark.parametrize(("layers", "batch", "context", "chunk"), [
    (4, 2, 1000, 8),  # the decode loop dominates (a prefill chunk of 8 is smaller)
    pytest.param(1, 2, 1000, 512, marks=pytest.mark.slow),  # the prefill chunk dominates
    pytest.param(2, 1, 3000, 512, marks=pytest.mark.slow)])
def test_decode_activation_estimate_is_close_to_xla(layers, batch, context, chunk,
                                                    monkeypatch):
    # XLA's analysis is taken of the programs without attention windows: a windowed pass's
    # largest branch computes what the whole-cache program computes, and the planner sizes
    # that branch, but XLA reports less for the windowed program (1 layer, batch 2, cache
    # 1024, chunk 512: 9.2 MB against 17.3 MB without windows).
    monkeypatch.setattr(infer.decode, "attention_windows", lambda max_len: ())
    config = tiny(num_hidden_layers=layers)
    plan = plan_decode(config, dtype="float32", batch=batch, context=context,
                       chunk_size=chunk)
    terms = plan.details["activation_terms"]
    assert (terms["iteration"] > terms["prefill"]) == (chunk == 8)
    ratio = plan.per_device["activations"] / xla_decode_temp(config, plan)
    assert DECODE_TOLERANCE[0] <= ratio <= DECODE_TOLERANCE[1], (ratio, terms)


@pytest.mark.parametrize("remat", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_train_activation_estimate_is_close_to_xla(remat):
    plan = plan_train(tiny(), dtype="float32", batch=2, seq_len=1024, anchors_per_seq=64,
                      block_size=8, remat=remat)
    ratio = plan.per_device["activations"] / xla_train_temp(tiny(), 2, 1024, 64, remat)
    assert TOLERANCE[0] <= ratio <= TOLERANCE[1], (ratio, plan.details["activation_terms"])


def test_remat_and_sharding_shrink_the_estimates():
    kw = dict(dtype="float32", batch=8, seq_len=512, anchors_per_seq=32, block_size=8)
    full = plan_train(tiny(), **kw, remat=False)
    remat = plan_train(tiny(), **kw)
    split = plan_train(tiny(), **kw, mesh={"data": 2, "tensor": 2})
    assert remat.per_device["activations"] < full.per_device["activations"]
    assert split.per_device["activations"] < remat.per_device["activations"]
    # tensor=2 halves the projections' moments; the q/k norms' are replicated
    assert remat.per_device["optimizer"] / 2 < split.per_device["optimizer"] < \
        remat.per_device["optimizer"]


def test_peak_memory_reports_host_rss_and_device_stats():
    before = peak_memory()
    block = np.ones((64 * 2**20,), np.uint8)  # 64 MiB, touched
    after = peak_memory()
    assert after["host_peak_rss_bytes"] >= max(before["host_peak_rss_bytes"], block.nbytes)
    assert set(after) == {"device", "device_peak_bytes", "device_bytes_in_use",
                          "device_bytes_limit", "host_peak_rss_bytes"}
    line = format_peak(after)
    assert "host peak RSS" in line and "\n" not in line
    if after["device_peak_bytes"] is None:  # the CPU backend keeps no statistics
        assert "no memory statistics" in line
    else:
        assert line.startswith("device peak ")


def test_byte_formatting_and_parsing():
    assert format_bytes(1_270_000_000) == "1.27 GB"
    assert format_bytes(302_000_000) == "302.0 MB"
    assert format_bytes(12_000) == "12.0 kB" and format_bytes(7) == "7 B"
    assert parse_bytes("32GB") == 32 * 10**9 == parse_bytes("32 gb") == parse_bytes("32e9")
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("1.5G") == 1_500_000_000
    for bad in ("lots", "32 GX", "0", "-1GB"):
        with pytest.raises(ValueError, match="e.g. 32GB|at least 1 byte"):
            parse_bytes(bad)
