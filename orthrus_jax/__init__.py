"""orthrus-jax: Orthrus diffusion drafting for frozen Qwen3-family models, in JAX/Flax NNX."""

from orthrus_jax.cache import KVCache, init_cache
from orthrus_jax.checkpoint import load_model, save_model
from orthrus_jax.config import ModelConfig, UnsupportedConfigError
from orthrus_jax.layers import DiffusionParam
from orthrus_jax.model import OrthrusLM, prefill, split_trainable, unstack_layers
from orthrus_jax.sharding import DEFAULT_RULES, logical_to_spec, make_mesh

__all__ = ["DEFAULT_RULES", "DiffusionParam", "KVCache", "ModelConfig", "OrthrusLM",
           "UnsupportedConfigError", "init_cache", "load_model", "logical_to_spec",
           "make_mesh", "prefill", "save_model", "split_trainable", "unstack_layers"]
