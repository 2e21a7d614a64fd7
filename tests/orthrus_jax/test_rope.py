"""Scaled RoPE (linear, llama3, yarn) against transformers: frequencies, logits past the
original window, config round trips, and the types and keys that are refused."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from convert import from_hf, to_hf
from orthrus_jax.cache import init_cache
from orthrus_jax.checkpoint import load_model
from orthrus_jax.cli import InputError
from orthrus_jax.config import ModelConfig
from orthrus_jax.rope import RopeScaling, inverse_frequencies, rope_tables
from tests.hf_reference import hf_logits, hf_model, to_orthrus

BASE = dict(model_type="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=1024, rope_theta=10000.0)

# Scalings as config.json carries them, with the head_dim each is tried at.
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.5},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
    "yarn-attention-factor": {"rope_type": "yarn", "factor": 4.0, "attention_factor": 0.8,
                              "beta_fast": 16, "beta_slow": 2,
                              "original_max_position_embeddings": 256},
    "yarn-mscale": {"rope_type": "yarn", "factor": 8.0, "mscale": 0.707,
                    "mscale_all_dim": 1.0, "original_max_position_embeddings": 128},
    "yarn-no-truncate": {"rope_type": "yarn", "factor": 4.0, "truncate": False,
                         "original_max_position_embeddings": 256},
    "yarn-old-style": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
}


def hf_frequencies(scaling: dict, head_dim: int, theta: float):
    config = transformers.Qwen3Config(**dict(BASE, head_dim=head_dim, rope_theta=theta,
                                             rope_scaling=dict(scaling)))
    rope_type = config.rope_parameters["rope_type"]
    inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.numpy(), factor


@pytest.mark.parametrize("name", SCALINGS)
@pytest.mark.parametrize("head_dim, theta", [(16, 10000.0), (128, 1e6)])
def test_frequencies_and_attention_factor_equal_transformers(name, head_dim, theta):
    c = ModelConfig.from_hf_dict(dict(BASE, head_dim=head_dim, rope_theta=theta,
                                      rope_scaling=dict(SCALINGS[name])))
    want, want_factor = hf_frequencies(SCALINGS[name], head_dim, theta)
    np.testing.assert_allclose(inverse_frequencies(head_dim, theta, c.rope_scaling), want,
                               rtol=1e-6)
    assert c.rope_scaling.cos_sin_factor() == pytest.approx(want_factor, rel=1e-12)
    # And scaling changes what plain RoPE computes (the test is not of two defaults).
    assert not np.allclose(inverse_frequencies(head_dim, theta), want, rtol=1e-3) or \
        want_factor != 1.0


def test_tables_carry_the_yarn_attention_factor():
    s = RopeScaling("yarn", 4.0, original_max_position_embeddings=256)
    positions = jnp.arange(8)[None]
    cos, sin = rope_tables(positions, 16, 1e4, s)
    plain_cos, _ = rope_tables(positions, 16, 1e4)
    np.testing.assert_allclose(np.asarray(cos[0, 0, 0]), 0.1 * np.log(4) + 1, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(plain_cos[0, 0, 0]), 1.0)
    assert np.asarray(sin).shape == (1, 8, 1, 8)


LOGIT_CASES = {
    "qwen3-yarn": ("qwen3", {"rope_type": "yarn", "factor": 4.0,
                             "original_max_position_embeddings": 256}),
    "llama-llama3": ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 256}),
    "llama-linear": ("llama", {"rope_type": "linear", "factor": 4.0}),
}


@pytest.mark.parametrize("case", LOGIT_CASES)
def test_logits_past_the_original_window_equal_transformers(case):
    model_type, scaling = LOGIT_CASES[case]
    hf = hf_model(model_type, seed=5, max_position_embeddings=1024,
                  rope_parameters=dict(scaling, rope_theta=10000.0))
    model = to_orthrus(hf)
    assert model.config.rope_scaling is not None
    tokens = np.random.default_rng(0).integers(0, 512, (1, 1024))
    cache = init_cache(model.config, 1, 1024)
    logits, _ = jax.jit(lambda m, t, c: m(t, c))(model, jnp.asarray(tokens), cache)
    want = hf_logits(hf, tokens)
    diff = np.abs(np.asarray(logits) - want).max(axis=(0, 2))
    assert diff.max() <= 1e-4, (diff[:256].max(), diff[256:].max())
    # Without the scaling the positions past the window differ: the test sees the scaling.
    plain = to_orthrus(hf, rope_scaling=None)
    logits, _ = jax.jit(lambda m, t, c: m(t, c))(plain, jnp.asarray(tokens), cache)
    assert np.abs(np.asarray(logits)[0, 256:] - want[0, 256:]).max() > 1e-3  # 10x the tolerance


@pytest.mark.parametrize("name", ["llama3", "yarn-mscale", "linear"])
def test_config_round_trip_keeps_the_scaling(tmp_path, name):
    c = ModelConfig.from_hf_dict(dict(BASE, rope_scaling=dict(SCALINGS[name])))
    c.save(tmp_path)
    assert ModelConfig.from_json_file(tmp_path) == c
    exported = json.loads((tmp_path / "config.json").read_text())
    hf = transformers.Qwen3Config.from_dict(exported)
    want, want_factor = hf_frequencies(SCALINGS[name], 16, 1e4)
    got, got_factor = ROPE_INIT_FUNCTIONS[hf.rope_parameters["rope_type"]](hf, "cpu")
    np.testing.assert_array_equal(got.numpy(), want)
    assert got_factor == want_factor


def test_convert_and_export_keep_yarn_and_transformers_loads_the_export(tmp_path):
    hf = hf_model("qwen3", seed=6, max_position_embeddings=1024,
                  rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                   "original_max_position_embeddings": 256})
    hf.save_pretrained(tmp_path / "src")
    assert from_hf.main([str(tmp_path / "src"), str(tmp_path / "dst"),
                         "--mask-token-id", "3"]) == 0
    model = load_model(tmp_path / "dst")
    assert model.config.rope_scaling == RopeScaling("yarn", 4.0,
                                                    original_max_position_embeddings=256)
    assert to_hf.main([str(tmp_path / "dst"), str(tmp_path / "out")]) == 0
    reloaded = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.rope_parameters["rope_type"] == "yarn"
    tokens = np.random.default_rng(2).integers(0, 512, (1, 400))
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(hf, tokens))


def test_rope_scaling_wins_over_rope_parameters_as_in_transformers():
    d = dict(BASE, rope_parameters={"rope_type": "default", "rope_theta": 5e5},
             rope_scaling={"rope_type": "linear", "factor": 2.0})
    c = ModelConfig.from_hf_dict(transformers.Qwen3Config(**d).to_dict())
    ours = ModelConfig.from_hf_dict(d)
    assert ours.rope_scaling == c.rope_scaling == RopeScaling("linear", 2.0)
    assert ours.rope_theta == c.rope_theta


def test_top_level_window_and_the_context_length_as_transformers_read_them():
    yarn = {"rope_type": "yarn", "factor": 4.0}
    c = ModelConfig.from_hf_dict(dict(BASE, rope_scaling=yarn))
    assert c.rope_scaling.original_max_position_embeddings == 1024
    c = ModelConfig.from_hf_dict(dict(BASE, rope_scaling=dict(
        yarn, original_max_position_embeddings=256), original_max_position_embeddings=128))
    assert c.rope_scaling.original_max_position_embeddings == 128


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "dynamic", "factor": 2.0},
     "rope_scaling.rope_type='dynamic' is not implemented"),
    ({"rope_type": "longrope", "factor": 2.0}, "rope_scaling.rope_type='longrope'"),
    ({"rope_type": "yarn"}, "rope_scaling.factor is required"),
    ({"rope_type": "yarn", "factor": -1.0}, "factor=-1.0 must be a positive finite number"),
    ({"rope_type": "yarn", "factor": 4.0, "beta_fast": "fast"},
     "beta_fast='fast' must be a positive finite number"),
    ({"rope_type": "yarn", "factor": 4.0, "truncate": "yes"}, "truncate='yes' must be"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0},
     "needs low_freq_factor and high_freq_factor"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0},
     "low_freq_factor=4.0 must be below high_freq_factor=1.0"),
    ({"rope_type": "linear", "factor": 2.0, "short_factor": [1.0]},
     "rope_scaling.short_factor=\\[1.0\\] is not supported for rope_type='linear'"),
    ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5},
     "rope_scaling.partial_rotary_factor=0.5 is not supported"),
    ("yarn", "rope_scaling='yarn' must be an object"),
])
def test_unsupported_or_malformed_scaling_names_the_field(rope, message):
    with pytest.raises(InputError, match=message):
        ModelConfig.from_hf_dict(dict(BASE, rope_scaling=rope))
