"""Helpers that write tiny llama.cpp-style GGUF files from HF-layout weights (for tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, TokenType

Q = GGMLQuantizationType

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Pairs merged in order; every result becomes a vocabulary token.
_MERGE_PAIRS = (
    ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"),
    ("Ġ", "s"), ("r", "e"), ("a", "t"), ("e", "n"), ("Ġ", "w"), ("o", "r"), ("Ġ", "c"),
    ("Ġ", "i"), ("Ġi", "s"), ("i", "s"), ("l", "l"), ("Ġw", "or"), ("Ġwor", "l"),
    ("Ġworl", "d"), ("H", "e"), ("He", "ll"), ("Hell", "o"), ("Ġc", "at"), ("Ġ", "p"),
    ("a", "p"), ("Ġ", "ap"), ("p", "l"), ("Ġap", "pl"), ("e", "s"), ("Ġappl", "es"),
    ("u", "s"), ("Ġ", "u"), ("Ġu", "s"), ("Ġus", "er"), ("a", "s"), ("Ġ", "as"),
    ("us", "er"), ("Ġas", "s"), ("4", "2"),
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def tiny_vocab() -> tuple[list[str], list[str], list[int]]:
    """(tokens, merges, token types): 3 ChatML control tokens, 256 byte tokens, ~40 merges."""
    tokens = list(SPECIAL_TOKENS)
    types = [int(TokenType.CONTROL)] * len(SPECIAL_TOKENS)
    byte_chars = bytes_to_unicode()
    tokens += [byte_chars[b] for b in range(256)]
    merges = []
    for a, b in _MERGE_PAIRS:
        assert a in tokens and b in tokens, (a, b)
        merges.append(f"{a} {b}")
        if a + b not in tokens:
            tokens.append(a + b)
    types += [int(TokenType.NORMAL)] * (len(tokens) - len(types))
    return tokens, merges, types


def tiny_config(model_type: str = "llama", **overrides: Any) -> dict[str, Any]:
    """HF config dict of a tiny model over ``tiny_vocab()`` (hidden 64, 2 layers, 4/2 heads)."""
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}[model_type]
    config: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [arch],
        "vocab_size": len(tiny_vocab()[0]),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "hidden_act": "silu",
    }
    if model_type == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    elif model_type == "qwen2":
        config.update(use_sliding_window=False)
    else:
        config.update(attention_bias=False)
    config.update(overrides)
    return config


def random_hf_state(config: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights with HF names and shapes for ``config``."""
    rng = np.random.default_rng(seed)
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d, nh, nkv = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]
    model_type = config["model_type"]

    def w(*shape: int, scale: float = 0.05) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    state = {"model.embed_tokens.weight": w(v, h, scale=0.5),
             "model.norm.weight": 1 + w(h, scale=0.1)}
    if not config["tie_word_embeddings"]:
        state["lm_head.weight"] = w(v, h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state |= {
            p + "input_layernorm.weight": 1 + w(h, scale=0.1),
            p + "post_attention_layernorm.weight": 1 + w(h, scale=0.1),
            p + "self_attn.q_proj.weight": w(nh * d, h),
            p + "self_attn.k_proj.weight": w(nkv * d, h),
            p + "self_attn.v_proj.weight": w(nkv * d, h),
            p + "self_attn.o_proj.weight": w(h, nh * d),
            p + "mlp.gate_proj.weight": w(f, h),
            p + "mlp.up_proj.weight": w(f, h),
            p + "mlp.down_proj.weight": w(h, f),
        }
        if model_type == "qwen2":
            state |= {p + "self_attn.q_proj.bias": w(nh * d),
                      p + "self_attn.k_proj.bias": w(nkv * d),
                      p + "self_attn.v_proj.bias": w(nkv * d)}
        if model_type == "qwen3":
            state |= {p + "self_attn.q_norm.weight": 1 + w(d, scale=0.1),
                      p + "self_attn.k_norm.weight": 1 + w(d, scale=0.1)}
    return state


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf ``LlamaModel.permute`` (HF rotate-half -> interleaved rows)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


_HF_TO_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_HF_TO_GGUF_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_tensor_name(hf_key: str) -> str:
    """GGUF name of an HF tensor name."""
    if hf_key in _HF_TO_GGUF_GLOBAL:
        return _HF_TO_GGUF_GLOBAL[hf_key]
    _, _, layer, rest = hf_key.split(".", 3)
    return f"blk.{layer}.{_HF_TO_GGUF_LAYER[rest]}"


def to_gguf_layout(
    hf_key: str, w: np.ndarray, config: dict[str, Any], qtype: GGMLQuantizationType
) -> tuple[np.ndarray, GGMLQuantizationType]:
    """(array to pass to ``GGUFWriter.add_tensor``, its type): permuted for llama, quantized."""
    if config["model_type"] == "llama":
        if hf_key.endswith(("q_proj.weight", "q_proj.bias")):
            w = llama_cpp_permute(w, config["num_attention_heads"])
        elif hf_key.endswith(("k_proj.weight", "k_proj.bias")):
            w = llama_cpp_permute(w, config["num_key_value_heads"])
    if w.ndim == 1:
        qtype = Q.F32  # llama.cpp keeps norms and biases in F32
    return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype), qtype


def write_tiny_gguf(
    path: str | Path,
    hf_state: dict[str, np.ndarray],
    config: dict[str, Any],
    qtype: GGMLQuantizationType = Q.F32,
    *,
    embed_qtype: GGMLQuantizationType | None = None,
    arch: str | None = None,
    tokenizer: bool = True,
    pre: str = "smollm",
    chat_template: str | None = CHATML_TEMPLATE,
    add_bos: bool = False,
    extra_metadata: dict[str, Any] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write ``hf_state`` (HF names/layout) as a llama.cpp-style GGUF file.

    ``qtype`` applies to 2-D matrices (``embed_qtype``, default ``qtype``, to the token
    embedding and ``lm_head``); 1-D tensors are F32. For llama, q/k rows are permuted as
    llama.cpp's converter does. ``tokenizer`` adds the ``tiny_vocab()`` BPE tokenizer
    (``add_bos``: the tokenizer prepends BOS).
    ``extra_metadata`` values are typed by Python type (str, bool, int -> uint32, float
    -> float32); ``extra_tensors`` are written as F32 under their given GGUF names.
    """
    path = Path(path)
    arch = arch or config["model_type"]
    embed_qtype = embed_qtype if embed_qtype is not None else qtype
    w = gguf.GGUFWriter(path, arch)
    w.add_name("tiny-test")
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_dimension_count(config["head_dim"])
    if config["model_type"] == "qwen3" or \
            config["head_dim"] != config["hidden_size"] // config["num_attention_heads"]:
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])
    w.add_file_type(int(qtype))
    if tokenizer:
        tokens, merges, types = tiny_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        for key, setter in (("bos_token_id", w.add_bos_token_id),
                            ("eos_token_id", w.add_eos_token_id),
                            ("pad_token_id", w.add_pad_token_id)):
            if config.get(key) is not None:
                setter(config[key])
        w.add_add_bos_token(add_bos)
        if chat_template is not None:
            w.add_chat_template(chat_template)
    for key, value in (extra_metadata or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_float32(key, float(value))

    for hf_key, value in hf_state.items():
        is_embed = hf_key in ("model.embed_tokens.weight", "lm_head.weight")
        data, dtype = to_gguf_layout(hf_key, value, config, embed_qtype if is_embed else qtype)
        raw = dtype if data.dtype == np.uint8 else None
        w.add_tensor(gguf_tensor_name(hf_key), data, raw_dtype=raw)
    for name, value in (extra_tensors or {}).items():
        w.add_tensor(name, np.asarray(value, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def expected_after_roundtrip(w: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """What a reader should return for HF tensor ``w`` written by ``write_tiny_gguf`` at ``qtype``.

    Quantization blocks run along rows and llama.cpp's permutation moves whole rows, so the
    two commute: the expectation needs no (un)permutation.
    """
    if w.ndim == 1:
        return w
    data = gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)
    return gguf.quants.dequantize(data, qtype).astype(np.float32).reshape(w.shape)
