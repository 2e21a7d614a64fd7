"""Bounded memory, measured: a synthetic 1.1 GB Qwen3-shaped bf16 checkpoint converts with a
peak of at most half its bytes over the runtime's baseline, and decodes with at most 1.15x
(weights + cache) over it. The baseline is the same command on the same architecture at a
negligible size (imports, compilation, allocator). Peaks are ``VmHWM`` of each command's
own process."""

from __future__ import annotations

import json

import pytest

from orthrus_jax.checkpoint import load_model
from orthrus_jax.config import ModelConfig
from orthrus_jax.memory import plan_decode
from tests.memory_fixtures import LARGE, SMALL, hf_config, peak_rss, write_checkpoint

pytestmark = pytest.mark.slow

GENERATE = ["--prompt-ids", "5,6,7,8", "--max-new-tokens", "8", "--json"]


def _memory_report(output: str) -> dict:
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    (report,) = [line["memory"] for line in lines if "memory" in line]
    return report


def test_conversion_and_decoding_peaks_stay_within_bounds(tmp_path):
    small_bytes = write_checkpoint(tmp_path / "small", SMALL)
    large_bytes = write_checkpoint(tmp_path / "large", LARGE)
    assert large_bytes > 1e9 and small_bytes < 1e6

    base, _ = peak_rss("convert.from_hf", [str(tmp_path / "small"), str(tmp_path / "small-m")])
    peak, out = peak_rss("convert.from_hf", [str(tmp_path / "large"), str(tmp_path / "large-m")])
    assert "peak memory" in out
    assert peak - base <= 0.5 * large_bytes, (peak, base, large_bytes)

    base, _ = peak_rss("infer.generate", ["--model", str(tmp_path / "small-m"), *GENERATE])
    peak, out = peak_rss("infer.generate", ["--model", str(tmp_path / "large-m"), *GENERATE])
    report = _memory_report(out)
    # stored in bf16, decoded in float32 on CPU (infer.engine.decode_dtype)
    assert report["weight_bytes"] == 2 * large_bytes
    config = ModelConfig.from_json_file(tmp_path / "large-m")
    per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * \
        config.head_dim * 4  # K and V of every layer, float32
    positions, lengths = divmod(report["cache_bytes"], per_position)
    # one row: 4 prompt tokens + 7 cached new ones in the least cache length
    assert lengths == 4 and positions == 256
    assert peak - base <= 1.15 * (report["weight_bytes"] + report["cache_bytes"]), (peak, base)
    # the planner, from the config alone, within 10% of the measured peak over the baseline
    plan = plan_decode(config, dtype="float32", batch=1, context=4, max_new_tokens=8)
    assert plan.details["cache_len"] == 256
    assert plan.per_device["weights"] == report["weight_bytes"]
    assert plan.per_device["cache"] == report["cache_bytes"]
    assert abs(plan.total_bytes - (peak - base)) <= 0.1 * (peak - base), (plan.total_bytes,
                                                                          peak - base)


def test_the_streamed_folder_holds_the_checkpoint_exactly(tmp_path):
    """Streaming changes how the folder is written, not what it holds (small model)."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import load_file

    write_checkpoint(tmp_path / "hf", SMALL)
    peak_rss("convert.from_hf", [str(tmp_path / "hf"), str(tmp_path / "m")])
    peak_rss("convert.to_hf", [str(tmp_path / "m"), str(tmp_path / "back")])
    original = load_file(str(tmp_path / "hf" / "model.safetensors"))
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(back) == set(original)
    for key, value in original.items():
        assert back[key].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(back[key].view(np.uint16), value.view(np.uint16), key)
    model = load_model(tmp_path / "m", per_layer=True)
    assert isinstance(model.layers.mlp.gate_proj.get_value(), tuple)


# A Qwen3-1.7B shape (2.07B parameters with the diffusion view) and the same architecture
# and layer count at a negligible size.
MODEL_2B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128)
MODEL_2B_BASE = dict(MODEL_2B, vocab_size=512, hidden_size=64, intermediate_size=128,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def test_the_random_model_build_holds_the_model_not_its_draws(tmp_path):
    """The device check's model of random weights, 2B parameters in bfloat16, peaks at
    most 1.2x its bytes over the same command on a negligible model."""
    peaks = {}
    for name, shape in (("base", MODEL_2B_BASE), ("2b", MODEL_2B)):
        config = tmp_path / f"{name}.json"
        config.write_text(json.dumps(hf_config(**shape)))
        out = tmp_path / f"{name}-report.json"
        peaks[name], _ = peak_rss("train.device_check", [
            "--config", str(config), "--dtype", "bfloat16", "--sections", "model",
            "--out", str(out)])
        report = json.loads(out.read_text())
    model = report["sections"]["model"]["result"]
    assert model["param_dtype"] == "bfloat16" and 2.0e9 < model["params"] < 2.2e9
    assert report["sections"]["model"]["plan"]["peak_bytes"] == model["param_bytes"]
    assert peaks["2b"] - peaks["base"] <= 1.2 * model["param_bytes"], (peaks, model)
