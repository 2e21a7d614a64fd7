"""One table between HF checkpoint keys and orthrus_jax parameter paths.

Each :class:`Entry` names an HF key, the parameter path (and layer index, for weights
stacked over layers) it fills, the HF shape, and the reshape/transpose each way. The same
table serves ``from_hf``, ``to_hf`` and ``from_gguf`` (after its own name mapping).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from orthrus_jax.config import ModelConfig
from orthrus_jax.model import AR_VIEW, DIFFUSION_VIEW

Path = tuple[str, ...]

# Each attention view's HF key suffix and parameter subtree.
VIEWS = (("", AR_VIEW), ("_diff", DIFFUSION_VIEW))


@dataclasses.dataclass(frozen=True)
class Entry:
    hf_key: str
    path: Path
    layer: int | None  # index into the leading ``layers`` axis, or None
    hf_shape: tuple[int, ...]
    to_param: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]

    @property
    def diffusion(self) -> bool:
        return DIFFUSION_VIEW in self.path


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _t(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


def _in_heads(d: int, h: int, hd: int):
    """``[h*hd, d]`` (HF) <-> ``[d, h, hd]`` (ours): input projection to heads."""
    return (lambda w: np.ascontiguousarray(w.T).reshape(d, h, hd),
            lambda a: np.ascontiguousarray(a.reshape(d, h * hd).T))


def _out_heads(d: int, h: int, hd: int):
    """``[d, h*hd]`` (HF) <-> ``[h, hd, d]`` (ours): heads back to the residual."""
    return (lambda w: np.ascontiguousarray(w.T).reshape(h, hd, d),
            lambda a: np.ascontiguousarray(a.reshape(h * hd, d).T))


def _bias(h: int, hd: int):
    return (lambda b: b.reshape(h, hd), lambda a: a.reshape(h * hd))


def entries(config: ModelConfig) -> list[Entry]:
    """Every HF key a checkpoint of this config has, diffusion keys included."""
    c = config
    D, F, V = c.hidden_size, c.intermediate_size, c.vocab_size
    Hq, Hkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    out = [Entry("model.embed_tokens.weight", ("embed_tokens",), None, (V, D), _same, _same),
           Entry("model.norm.weight", ("norm",), None, (D,), _same, _same)]
    if not c.tie_word_embeddings:
        out.append(Entry("lm_head.weight", ("lm_head",), None, (V, D), _t, _t))
    for i in range(c.num_hidden_layers):
        pre = f"model.layers.{i}."

        def add(key: str, path: Path, shape: tuple[int, ...], fwd=_same, inv=_same) -> None:
            out.append(Entry(pre + key, ("layers", *path), i, shape, fwd, inv))  # noqa: B023

        add("input_layernorm.weight", ("input_norm",), (D,))
        add("post_attention_layernorm.weight", ("post_attn_norm",), (D,))
        for sfx, view in VIEWS:
            for name, h in (("q", Hq), ("k", Hkv), ("v", Hkv)):
                add(f"self_attn.{name}_proj{sfx}.weight", (view, f"{name}_proj"), (h * hd, D),
                    *_in_heads(D, h, hd))
                if c.qkv_bias:
                    add(f"self_attn.{name}_proj{sfx}.bias", (view, f"{name}_bias"), (h * hd,),
                        *_bias(h, hd))
            add(f"self_attn.o_proj{sfx}.weight", (view, "o_proj"), (D, Hq * hd),
                *_out_heads(D, Hq, hd))
            if c.o_bias:
                add(f"self_attn.o_proj{sfx}.bias", (view, "o_bias"), (D,))
            if c.qk_norm:
                add(f"self_attn.q_norm{sfx}.weight", (view, "q_norm"), (hd,))
                add(f"self_attn.k_norm{sfx}.weight", (view, "k_norm"), (hd,))
        add("mlp.gate_proj.weight", ("mlp", "gate_proj"), (F, D), _t, _t)
        add("mlp.up_proj.weight", ("mlp", "up_proj"), (F, D), _t, _t)
        add("mlp.down_proj.weight", ("mlp", "down_proj"), (D, F), _t, _t)
    return out


def ar_twin(entry: Entry) -> Path:
    """The AR parameter path whose values a fresh diffusion tensor copies."""
    return tuple(AR_VIEW if p == DIFFUSION_VIEW else p for p in entry.path)


def get_path(tree: dict, path: Path):
    for p in path:
        tree = tree[p]
    return tree


def set_path(tree: dict, path: Path, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value
