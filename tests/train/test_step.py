"""The training objective and the sharded train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infer.engine import Generator
from orthrus_jax.cache import init_cache
from orthrus_jax.sharding import make_mesh
from tests.hf_reference import hf_model, to_orthrus
from train.objective import anchor_blocks, teacher_pass, training_loss
from train.step import TrainConfig, Trainer

K = 4


@pytest.fixture(scope="module")
def model():
    return to_orthrus(hf_model("qwen3", False, seed=4), block_size=K)


def random_batch(rng, A=2, B=8, L=32, M=6):
    return {"tokens": rng.integers(0, 512, (A, B, L)).astype(np.int32),
            "anchors": np.sort(rng.integers(1, L - K + 1, (A, B, M)), -1).astype(np.int32),
            "anchor_mask": rng.random((A, B, M)) < 0.9}


def place(trainer, batch):
    return {k: jax.device_put(v, trainer.batch_sharding(v.ndim)) for k, v in batch.items()}


@pytest.mark.slow
def test_training_logits_equal_the_decoders_diffusion_pass(model):
    """For one anchor, the training diffusion logits of a block equal the decoder's
    diffusion pass over a cache holding the same prefix."""
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 512, (1, 24)))
    anchors = jnp.array([[11]])
    _, cache = teacher_pass(model, tokens)
    blocks = anchor_blocks(tokens, anchors, K, model.config.mask_token_id)
    train_logits = model.logits(model.diffusion_blocks(blocks, anchors, cache))[0, 0]
    prefix = init_cache(model.config, 1, 24)
    _, prefix = model(tokens[:, :11], prefix)
    decode_logits = model.logits(model.diffusion_hidden(blocks[:, 0], prefix))[0]
    np.testing.assert_allclose(np.asarray(train_logits), np.asarray(decode_logits), atol=1e-4)


@pytest.mark.slow
def test_loss_equals_a_reference_built_from_the_decoder_path(model):
    """KL(p_{a+i} || q_i) and CE summed over drafted positions, against numpy on the
    decoder's one-block pass and the full AR logits."""
    rng = np.random.default_rng(1)
    L = 16
    tokens = rng.integers(0, 512, (2, L))
    anchors = np.array([[1, 5, 9], [2, 3, 12]])
    mask = np.array([[1, 1, 1], [1, 0, 1]], bool)
    ar_logits, _ = model(jnp.asarray(tokens), init_cache(model.config, 2, L))
    logp = np.asarray(jax.nn.log_softmax(ar_logits, -1))
    kl = ce = 0.0
    for r in range(2):
        for j, a in enumerate(anchors[r]):
            if not mask[r, j]:
                continue
            prefix = init_cache(model.config, 1, L)
            _, prefix = model(jnp.asarray(tokens[r:r + 1, :a]), prefix)
            block = jnp.array([[tokens[r, a]] + [model.config.mask_token_id] * (K - 1)])
            logq = np.asarray(jax.nn.log_softmax(
                model.logits(model.diffusion_hidden(block, prefix))[0], -1))
            for i in range(K - 1):
                p = logp[r, a + i]
                kl += float(np.sum(np.exp(p) * (p - logq[i])))
                ce -= float(logq[i, tokens[r, a + i + 1]])
    args = (jnp.asarray(tokens), jnp.asarray(anchors), jnp.asarray(mask))
    total, metrics = training_loss(model, *args, loss_chunk=2)
    assert float(metrics["positions"]) == 5 * (K - 1)
    np.testing.assert_allclose(float(total), kl, rtol=1e-4)
    total_ce, _ = training_loss(model, *args, loss="ce")
    np.testing.assert_allclose(float(total_ce), ce, rtol=1e-4)


@pytest.mark.slow
def test_masked_anchors_and_chunking_do_not_change_the_loss(model):
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, 512, (2, 32)))
    anchors = jnp.asarray(np.sort(rng.integers(1, 29, (2, 5)), -1))
    mask = jnp.array([[1, 1, 0, 1, 1], [1, 0, 0, 1, 1]], bool)
    full, m1 = training_loss(model, tokens, anchors, mask, loss_chunk=5)
    chunked, m2 = training_loss(model, tokens, anchors, mask, loss_chunk=2)
    assert float(m1["positions"]) == 7 * (K - 1)
    np.testing.assert_allclose(float(full), float(chunked), rtol=1e-5)
    # a masked anchor contributes nothing, wherever it points
    moved = anchors.at[0, 2].set(3)
    again, _ = training_loss(model, tokens, moved, mask, loss_chunk=2)
    np.testing.assert_allclose(float(again), float(full), rtol=1e-5)


@pytest.mark.slow
def test_only_the_diffusion_subtree_trains(model):
    before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model)))
    trainer = Trainer(model, TrainConfig(total_steps=4, lr=1e-3), make_mesh({"data": 1},
                                                                            jax.devices()[:1]))
    state = trainer.init_state()
    batch = place(trainer, random_batch(np.random.default_rng(3), A=1, B=2))
    for _ in range(3):
        state, metrics = trainer.step(state, batch)
    after = nnx.to_pure_dict(nnx.state(trainer.model(state)))
    flat_before = dict(nnx.to_flat_state(nnx.State(before)))
    for path, value in nnx.to_flat_state(nnx.State(after)):
        if "diff_attn" in path:
            continue
        np.testing.assert_array_equal(np.asarray(value), flat_before[path], err_msg=str(path))
    assert not np.array_equal(np.asarray(after["layers"]["diff_attn"]["q_proj"]),
                              flat_before[("layers", "diff_attn", "q_proj")])
    # optimizer moments exist for the six diffusion tensors only
    moments = sorted(x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim)
    shapes = [x.shape for x in jax.tree.leaves(state.diffusion)]
    assert len(shapes) == 6 and moments == sorted(shapes * 2)  # Adam mu and nu, nothing else
    assert float(metrics["lr"]) > 0


@pytest.mark.parametrize("mesh_shape", [{"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2},
                                        {"fsdp": 4, "tensor": 2}])
@pytest.mark.slow
def test_sharded_step_equals_one_device(model, mesh_shape):
    batch = random_batch(np.random.default_rng(5))
    results = []
    for shape, devices in ((mesh_shape, None), ({"data": 1}, jax.devices()[:1])):
        trainer = Trainer(model, TrainConfig(total_steps=10, grad_accum=2, lr=1e-3,
                                             warmup_frac=0.0), make_mesh(shape, devices))
        state = trainer.init_state()
        placed = place(trainer, batch)
        losses = []
        for _ in range(2):
            state, metrics = trainer.step(state, placed)
            losses.append(float(metrics["loss"]))
        results.append((losses, jax.tree.map(np.asarray, nnx.to_pure_dict(state.diffusion))))
    (l8, w8), (l1, w1) = results
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    assert l8[1] < l8[0]
    # Adam divides by sqrt(v): reduction-order noise in tiny gradients moves weights by
    # up to ~1% of the learning rate.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), w8, w1)


@pytest.mark.slow
def test_loss_falls_and_the_decoder_accepts_more():
    """A few dozen steps on the model's own greedy continuations: the loss falls and the
    decoder's mean tokens per iteration on the training prompts rises. (Weights drawn
    with std 0.1 give the teacher distributions some shape; at HF's default 0.02 they are
    nearly uniform and the KL carries little signal.)"""
    model = to_orthrus(hf_model("qwen3", False, seed=4, initializer_range=0.1), block_size=K)
    gen = Generator(model)
    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, 512, 4).tolist() for _ in range(8)]
    before = gen.generate(prompts, max_new_tokens=28)
    seqs = np.array([p + r.token_ids for p, r in zip(prompts, before, strict=True)], np.int32)
    tpi_before = np.mean([r.tokens_per_iteration for r in before])
    L = seqs.shape[1]
    anchors = np.tile(np.arange(3, L - K + 1, dtype=np.int32), (8, 1))
    batch = {"tokens": seqs[None], "anchors": anchors[None],
             "anchor_mask": np.ones(anchors[None].shape, bool)}
    trainer = Trainer(model, TrainConfig(total_steps=40, lr=1e-2, warmup_frac=0.1),
                      make_mesh({"data": 8}))
    state = trainer.init_state()
    placed = place(trainer, batch)
    losses = []
    for _ in range(40):
        state, metrics = trainer.step(state, placed)
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    after = Generator(trainer.model(state)).generate(prompts, max_new_tokens=28)
    assert [r.token_ids for r in after] == [r.token_ids for r in before]  # still lossless
    tpi_after = np.mean([r.tokens_per_iteration for r in after])
    assert tpi_after > tpi_before + 0.15, (tpi_before, tpi_after)  # measured 1.39 -> 1.68


def test_bad_settings():
    with pytest.raises(ValueError, match="grad_accum=0"):
        TrainConfig(total_steps=1, grad_accum=0)
    with pytest.raises(ValueError, match="loss='mse'"):
        TrainConfig(total_steps=1, loss="mse")
    with pytest.raises(ValueError, match="total_steps=0"):
        TrainConfig(total_steps=0)
