"""Config dataclasses from every ``config.json`` variant the project supports, and the
errors for what is not implemented."""

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from orthrus_jax.config import (
    DTYPE_NAMES,
    DTYPES,
    MODEL_TYPES,
    ModelConfig,
    UnsupportedConfigError,
    dtype_name,
    numpy_dtype,
)

BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def test_qwen3_transformers5_rope_parameters_and_orthrus_fields():
    c = ModelConfig.from_hf_dict(dict(BASE, model_type="qwen3", architectures=["OrthrusLM"],
                                      head_dim=32, auto_map={"AutoModel": "x.OrthrusLM"},
                                      rope_parameters={"rope_theta": 5e5, "rope_type": "default"},
                                      block_size=16, mask_token_id=7, eos_token_id=[3, 4],
                                      bos_token_id=None, pad_token_id=None,
                                      layer_types=["full_attention"] * 2))
    assert (c.rope_theta, c.block_size, c.mask_token_id, c.eos_token_id) == (5e5, 16, 7, (3, 4))
    assert c.qk_norm and not c.qkv_bias and c.head_dim == 32 and c.bos_token_id is None


def test_llama_old_style_rope_theta_and_derived_head_dim():
    c = ModelConfig.from_hf_dict(dict(BASE, model_type="llama", rope_theta=1e5, eos_token_id=2))
    assert (c.rope_theta, c.head_dim, c.eos_token_id) == (1e5, 16, (2,))
    assert not c.qk_norm and not c.qkv_bias and not c.o_bias


def test_qwen2_has_qkv_bias_and_orthrus_model_type_is_qwen3_like():
    assert ModelConfig.from_hf_dict(dict(BASE, model_type="qwen2")).qkv_bias
    c = ModelConfig.from_hf_dict(dict(BASE, model_type="orthrus"))
    assert c.qk_norm and c.to_hf_dict()["model_type"] == "qwen3"


def test_round_trip_through_json(tmp_path):
    c = ModelConfig.from_hf_dict(dict(BASE, model_type="qwen3", mask_token_id=5, block_size=8,
                                      eos_token_id=[1, 2], tie_word_embeddings=True))
    c.save(tmp_path)
    assert ModelConfig.from_json_file(tmp_path) == c
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["block_size"] == 8 and d["mask_token_id"] == 5


@pytest.mark.parametrize("extra, field", [
    (dict(model_type="mixtral"), "model_type='mixtral'"),
    (dict(model_type="qwen3", rope_scaling={"rope_type": "dynamic", "factor": 4.0}),
     "rope_scaling.rope_type='dynamic'"),
    (dict(model_type="llama", rope_parameters={"rope_type": "longrope", "rope_theta": 5e5}),
     "rope_parameters.rope_type='longrope'"),
    (dict(model_type="qwen3", use_sliding_window=True), "use_sliding_window=True"),
    (dict(model_type="qwen3", layer_types=["full_attention", "sliding_attention"]),
     "layer_types[1]='sliding_attention'"),
    (dict(model_type="qwen3", num_experts=8), "num_experts=8"),
    (dict(model_type="llama", hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(model_type="llama", mlp_bias=True), "mlp_bias=True"),
])
def test_unsupported_fields_name_field_and_value(extra, field):
    with pytest.raises(UnsupportedConfigError, match="my/config.json") as e:
        ModelConfig.from_hf_dict(dict(BASE, **extra), source="my/config.json")
    assert field in str(e.value)


def test_invalid_values_and_missing_fields():
    with pytest.raises(ValueError, match=r"missing required field\(s\) \['vocab_size'\]"):
        ModelConfig.from_hf_dict({k: v for k, v in dict(BASE, model_type="qwen3").items()
                                  if k != "vocab_size"})
    with pytest.raises(ValueError, match="mask_token_id=600 is outside the vocabulary"):
        ModelConfig.from_hf_dict(dict(BASE, model_type="qwen3", mask_token_id=600))
    with pytest.raises(ValueError, match="not a multiple of num_key_value_heads=3"):
        ModelConfig.from_hf_dict(dict(BASE, model_type="qwen3", num_key_value_heads=3))


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelConfig.from_json_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_json_file(tmp_path)


def test_one_dtype_table_for_jax_numpy_and_the_cli():
    assert DTYPE_NAMES == ("float32", "bfloat16", "float16") == tuple(DTYPES)
    assert numpy_dtype("bfloat16") == np.dtype(ml_dtypes.bfloat16) == np.dtype(jnp.bfloat16)
    assert numpy_dtype("float16") == np.float16
    assert [dtype_name(numpy_dtype(n)) for n in DTYPE_NAMES] == list(DTYPE_NAMES)
    assert dtype_name(np.int8) is None
    with pytest.raises(ValueError, match="'int8': choose one of"):
        numpy_dtype("int8")


@pytest.mark.parametrize("model_type", list(MODEL_TYPES))
def test_architecture_table_drives_config_and_export(model_type):
    arch = MODEL_TYPES[model_type]
    c = ModelConfig.from_hf_dict(dict(BASE, model_type=model_type))
    assert (c.qk_norm, c.qkv_bias, c.o_bias) == (arch.qk_norm, arch.qkv_bias, False)
    d = c.to_hf_dict()
    assert d["architectures"] == [arch.hf_class]
    assert d["model_type"] == (arch.export_as or model_type)
    assert ModelConfig.from_hf_dict(d).qk_norm == arch.qk_norm
