"""Optimisation of the diffusion subtree: the optimizer, the train state and the sharded,
jitted train step with gradient accumulation.

Only :class:`~orthrus_jax.layers.DiffusionParam` tensors get gradients and optimizer
state; the frozen backbone is an input of the step and is never updated. Parameters,
optimizer state and batches are placed on the mesh by the logical-axis rules; the step
is ``jax.jit`` with explicit in/out shardings and donates the train state it replaces.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from orthrus_jax.model import OrthrusLM, split_trainable
from orthrus_jax.sharding import Rules, logical_to_spec, state_shardings, variable_sharding
from train.objective import LOSSES, training_loss

BATCH_KEYS = ("tokens", "anchors", "anchor_mask")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; the defaults are the published recipe (see README)."""

    total_steps: int
    lr: float = 2e-4
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.0
    warmup_frac: float = 0.05
    clip_norm: float = 1.0
    grad_accum: int = 1
    loss: str = "kl"
    loss_chunk: int = 16
    remat: bool = False

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps={self.total_steps} must be >= 1")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum={self.grad_accum} must be >= 1")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}: choose one of {LOSSES}")

    def schedule(self) -> optax.Schedule:
        """Linear warm-up over ``warmup_frac`` of the steps, then cosine decay to 0."""
        warmup = round(self.warmup_frac * self.total_steps)
        if warmup == 0:
            return optax.cosine_decay_schedule(self.lr, self.total_steps)
        return optax.warmup_cosine_decay_schedule(
            0.0, self.lr, warmup_steps=warmup, decay_steps=max(self.total_steps, warmup + 1),
            end_value=0.0)

    def optimizer(self) -> optax.GradientTransformation:
        return optax.chain(optax.clip_by_global_norm(self.clip_norm),
                           optax.adamw(self.schedule(), b1=self.b1, b2=self.b2,
                                       weight_decay=self.weight_decay))


def _placed(tree, shardings, dtype=None):
    """``tree``'s arrays on ``shardings``, a prefix of ``tree`` (as fresh copies in
    ``dtype`` when given); ``ShapeDtypeStruct`` leaves stay abstract, with the sharding
    and dtype attached."""
    def one(x, sharding):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=sharding)
        return jax.device_put(x if dtype is None else jnp.array(x, dtype, copy=True), sharding)

    return jax.tree.map(lambda sharding, var: jax.tree.map(lambda x: one(x, sharding), var),
                        shardings, tree)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """What a train step replaces: the step count, the diffusion subtree (float32) and
    the optimizer state, which exists for those tensors only."""

    step: jax.Array
    diffusion: nnx.State
    opt_state: optax.OptState


class Trainer:
    """The sharded train step for one model on one mesh.

    ``trainer.step(state, batch)``: ``batch`` holds ``tokens [A, B, L]``, ``anchors
    [A, B, m]`` and ``anchor_mask [A, B, m]`` (``A`` = ``grad_accum`` micro-batches of the
    global batch ``B``, sharded over the mesh's data axes). Returns the new state and the
    metrics ``loss``, ``accuracy``, ``grad_norm``, ``lr`` and ``positions``.
    """

    def __init__(self, model: OrthrusLM, config: TrainConfig, mesh: Mesh,
                 rules: Rules | None = None):
        self.config, self.mesh, self.rules = config, mesh, rules
        self.optimizer = config.optimizer()
        self.graphdef, diffusion, backbone = split_trainable(model)
        diff_sh = state_shardings(diffusion, mesh, rules)
        # A model of ShapeDtypeStruct leaves gives an abstract trainer: its step can be
        # lowered and sized (with abstract_state()) without allocating anything.
        self.backbone = _placed(backbone, state_shardings(backbone, mesh, rules))
        # A float32 copy: the step donates it, and must not delete the model's arrays.
        self._diffusion_init = _placed(diffusion, diff_sh, jnp.float32)
        abstract = jax.eval_shape(self.optimizer.init, self._diffusion_init)
        replicated = NamedSharding(mesh, PartitionSpec())
        # Moments mirror the diffusion tensors and shard like them; counters replicate.
        opt_sh = optax.tree_map_params(
            self.optimizer, lambda v: variable_sharding(v, mesh, rules), abstract,
            transform_non_params=lambda _: replicated,
            is_leaf=lambda x: isinstance(x, nnx.Variable))
        self.state_shardings = TrainState(replicated, diff_sh, opt_sh)
        self._step = jax.jit(self._step_fn, in_shardings=(self.state_shardings, None, None),
                             out_shardings=(self.state_shardings, replicated),
                             donate_argnums=0)

    def init_state(self) -> TrainState:
        """Step 0: the model's diffusion tensors in float32 and fresh optimizer state."""
        init = jax.jit(self.optimizer.init, out_shardings=self.state_shardings.opt_state)
        return TrainState(jax.device_put(jnp.int32(0), self.state_shardings.step),
                          self._diffusion_init, init(self._diffusion_init))

    def abstract_state(self) -> TrainState:
        """What :meth:`init_state` returns, as ``ShapeDtypeStruct`` leaves with their
        shardings; allocates nothing."""
        shapes = jax.eval_shape(lambda d: TrainState(jnp.int32(0), d, self.optimizer.init(d)),
                                self._diffusion_init)
        return _placed(shapes, self.state_shardings)

    def batch_sharding(self, ndim: int) -> NamedSharding:
        """Sharding of a ``[A, B, ...]`` batch array: ``B`` over the data axes."""
        spec = logical_to_spec((None, "batch") + (None,) * (ndim - 2), self.mesh, self.rules)
        return NamedSharding(self.mesh, spec)

    def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        return self._step(state, self.backbone, batch)

    def model(self, state: TrainState) -> OrthrusLM:
        """The model with the state's diffusion tensors (cast to the backbone's dtype)."""
        dtype = jax.tree.leaves(self.backbone)[0].dtype
        diffusion = jax.tree.map(lambda x: x.astype(dtype), state.diffusion)
        return nnx.merge(self.graphdef, diffusion, self.backbone)

    # ------------------------------------------------------------------ the step
    def _step_fn(self, state: TrainState, backbone: nnx.State, batch: dict):
        c = self.config

        def loss_fn(diffusion, micro):
            model = nnx.merge(self.graphdef, diffusion, backbone)
            return training_loss(model, micro["tokens"], micro["anchors"],
                                 micro["anchor_mask"], loss=c.loss, loss_chunk=c.loss_chunk,
                                 remat=c.remat)

        grad_fn = jax.grad(loss_fn, has_aux=True)

        def accumulate(acc, micro):
            grads, metrics = grad_fn(state.diffusion, micro)
            return jax.tree.map(jnp.add, acc, (grads, metrics)), None

        zeros = (jax.tree.map(jnp.zeros_like, state.diffusion),
                 {"loss_sum": jnp.float32(0), "hits": jnp.float32(0),
                  "positions": jnp.float32(0)})
        (grads, sums), _ = jax.lax.scan(accumulate, zeros, {k: batch[k] for k in BATCH_KEYS})
        n = jnp.maximum(sums["positions"], 1.0)
        grads = jax.tree.map(lambda g: g / n, grads)  # gradient of the mean loss
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.diffusion)
        diffusion = optax.apply_updates(state.diffusion, updates)
        metrics = {"loss": sums["loss_sum"] / n, "accuracy": sums["hits"] / n,
                   "grad_norm": optax.tree.norm(grads),
                   "lr": c.schedule()(state.step), "positions": sums["positions"]}
        return TrainState(state.step + 1, diffusion, opt_state), metrics
