"""Tiny random Hugging Face models (torch, test reference only) and their conversion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

from convert.model_folder import build_params
from orthrus_jax.checkpoint import model_from_params
from orthrus_jax.config import ModelConfig

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
            max_position_embeddings=256, rope_theta=10000.0)

CLASSES = {
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
}


def hf_model(model_type: str = "qwen3", tied: bool = False, seed: int = 0, **overrides):
    """A random float32 HF causal LM of a tiny config, in eval mode."""
    config_cls, model_cls = CLASSES[model_type]
    kwargs = dict(TINY, tie_word_embeddings=tied, **overrides)
    if model_type == "qwen2":
        kwargs.pop("head_dim")
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # norms are ones at init: randomise them so they matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}


def hf_config_dict(model, **extra) -> dict:
    d = model.config.to_dict()
    d.update(extra)
    return d


def to_orthrus(model, dtype: str = "float32", mask_token_id: int = 3, **config_overrides):
    """The orthrus_jax model with the same weights as the HF ``model``."""
    config = ModelConfig.from_hf_dict(hf_config_dict(model), mask_token_id=mask_token_id,
                                      param_dtype=dtype, dtype=dtype, **config_overrides)
    params, _ = build_params(config, hf_state(model).items(), dtype)
    return model_from_params(config, params)


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def save_hf(model, directory: Path, **extra_config) -> Path:
    model.save_pretrained(directory)
    if extra_config:
        import json
        cfg = json.loads((directory / "config.json").read_text())
        cfg.update(extra_config)
        (directory / "config.json").write_text(json.dumps(cfg))
    return directory


def tiny_chat_tokenizer():
    """A byte-level BPE tokenizer of ~300 ids with ChatML specials and chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.convert.gguf_fixtures import CHATML_TEMPLATE, SPECIAL_TOKENS, tiny_vocab

    tokens, merges, _ = tiny_vocab()
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)},
                               [tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                 bos_token="<|im_start|>", unk_token="<|endoftext|>")
    hf.chat_template = CHATML_TEMPLATE
    return hf


def tiny_model_dir(directory: Path, block_size: int = 4, seed: int = 0, **hf_overrides) -> Path:
    """A model folder (config, params, chat tokenizer) of a tiny random Qwen3."""
    from orthrus_jax.checkpoint import save_model

    tokenizer = tiny_chat_tokenizer()
    model = to_orthrus(hf_model("qwen3", False, seed=seed, **hf_overrides),
                       block_size=block_size, eos_token_id=(tokenizer.eos_token_id,))
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, directory)
    tokenizer.save_pretrained(directory)
    return directory
