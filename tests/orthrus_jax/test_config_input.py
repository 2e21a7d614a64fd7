"""``config.json`` from elsewhere: every field the config reads is checked for type and
range, and a bad one is an ``InputError`` naming the file and the field; fuzzed configs
give a config or that error, nothing else."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orthrus_jax.cli import InputError
from orthrus_jax.config import MAX_DIM, ModelConfig
from orthrus_jax.rope import inverse_frequencies

EXAMPLES = int(os.environ.get("ORTHRUS_FUZZ_EXAMPLES", "150"))
GOOD = dict(model_type="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=256,
            tie_word_embeddings=False, block_size=8, mask_token_id=3, bos_token_id=1,
            eos_token_id=[2, 5], pad_token_id=None)


@pytest.mark.parametrize("change,message", [
    (dict(vocab_size="512"), "vocab_size='512' must be an integer in [1, "),
    (dict(vocab_size=-5), "vocab_size=-5 must be an integer"),
    (dict(hidden_size=[64]), "hidden_size=[64] must be an integer"),
    (dict(num_hidden_layers=True), "num_hidden_layers=True must be an integer"),
    (dict(num_attention_heads=2**40), f"must be an integer in [1, {MAX_DIM}]"),
    (dict(num_key_value_heads=0), "num_key_value_heads=0 must be an integer"),  # was 1/0
    (dict(head_dim=None, num_attention_heads=128), "head_dim=0 must be an integer"),
    (dict(head_dim=15), "head_dim=15 must be even"),
    (dict(intermediate_size=1.5), "intermediate_size=1.5 must be an integer"),
    (dict(rms_norm_eps="tiny"), "rms_norm_eps='tiny' must be a positive finite number"),
    (dict(rms_norm_eps=-1e-6), "rms_norm_eps=-1e-06 must be a positive finite number"),
    (dict(rope_theta=0), "rope_theta=0 must be a positive finite number"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": "big"}),
     "rope_theta='big' must be a positive finite number"),
    (dict(tie_word_embeddings="yes"), "tie_word_embeddings='yes' must be true or false"),
    (dict(attention_bias=1), "attention_bias=1 must be true or false"),
    (dict(mask_token_id="3"), "mask_token_id='3' must be a token id"),
    (dict(mask_token_id=512), "mask_token_id=512 is outside the vocabulary"),
    (dict(bos_token_id=-1), "bos_token_id=-1 must be a token id"),
    (dict(eos_token_id="2"), "eos_token_id='2' must be a token id or a list of them"),
    (dict(eos_token_id=[2, None]), "eos_token_id=[2, None] must be a token id"),
    (dict(block_size=1), "block_size=1 must be at least 2"),
    (dict(layer_types="full_attention"), "layer_types='full_attention' must be a list"),
    (dict(model_type=["qwen3"]), "model_type=['qwen3'] is not supported"),
    (dict(max_position_embeddings=0), "max_position_embeddings=0 must be an integer"),
])
def test_bad_field_names_file_and_field(change, message):
    with pytest.raises(InputError) as e:
        ModelConfig.from_hf_dict(dict(GOOD, **change), source="m/config.json")
    assert str(e.value).startswith("m/config.json: ") and message in str(e.value), str(e.value)


def test_a_json_file_that_is_not_an_object_or_not_text(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2]")
    with pytest.raises(InputError, match=f"{path}: expected a JSON object, got list"):
        ModelConfig.from_json_file(path)
    path.write_bytes(b"\xff\xfe{")
    with pytest.raises(InputError, match=f"{path}: not valid JSON"):
        ModelConfig.from_json_file(path)


def test_the_good_config_and_exporter_floats_are_read():
    c = ModelConfig.from_hf_dict(dict(GOOD, vocab_size=512.0))
    assert c.vocab_size == 512 and isinstance(c.vocab_size, int)
    assert c.eos_token_id == (2, 5) and c.mask_token_id == 3


# ------------------------------------------------------------------ fuzzing
VALUES = (st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats()
          | st.text(max_size=6) | st.lists(st.integers(-3, 600), max_size=3)
          | st.dictionaries(st.sampled_from(["rope_type", "rope_theta", "type", "factor",
                                             "original_max_position_embeddings",
                                             "low_freq_factor", "high_freq_factor",
                                             "beta_fast", "attention_factor", "truncate"]),
                            st.none() | st.floats() | st.integers(-5, 10**6) | st.booleans()
                            | st.text(max_size=8)
                            | st.sampled_from(["yarn", "llama3", "linear", "default"]),
                            max_size=5))


@settings(max_examples=EXAMPLES, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(st.sampled_from(sorted(GOOD) + [
    "rope_parameters", "rope_scaling", "attention_bias", "layer_types", "hidden_act",
    "torch_dtype", "dtype", "use_sliding_window"]), VALUES, max_size=4),
    dropped=st.sets(st.sampled_from(sorted(GOOD)), max_size=2))
def test_fuzzed_configs_give_a_config_or_the_error(changes, dropped):
    d = {k: v for k, v in dict(GOOD, **changes).items() if k not in dropped}
    try:
        c = ModelConfig.from_hf_dict(d, source="fuzz/config.json")
    except InputError as e:
        assert str(e).startswith("fuzz/config.json: "), str(e)
    else:
        assert 1 <= c.vocab_size <= MAX_DIM and c.num_attention_heads % c.num_key_value_heads == 0
        inv_freq = inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
        assert np.isfinite(inv_freq).all() and (inv_freq > 0).all()


@settings(max_examples=EXAMPLES, deadline=2000,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 400), flips=st.lists(st.tuples(st.integers(0, 399),
                                                         st.integers(0, 255)), max_size=3))
def test_fuzzed_config_files_give_a_config_or_the_error(tmp_path, cut, flips):
    data = bytearray(json.dumps(GOOD).encode()[:cut])
    for i, b in flips:
        if i < len(data):
            data[i] = b
    path = tmp_path / "config.json"
    path.write_bytes(bytes(data))
    try:
        ModelConfig.from_json_file(path)
    except InputError as e:
        assert str(e).startswith(str(path)), str(e)
