"""``python -m infer.plan``: the memory plan of a config, as a table or JSON, and its
refusals of bad input."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from infer import plan
from orthrus_jax.config import ModelConfig
from orthrus_jax.memory import plan_decode, plan_train

QWEN3_8B = Path(__file__).parents[2] / "infer" / "configs" / "qwen3-8b.json"
TINY = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   max_position_embeddings=4096, block_size=8, mask_token_id=3)


def run(*args) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``python -m infer.plan ARGS`` (in process)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = plan.main([str(a) for a in args])
        except SystemExit as e:  # argparse's refusals
            status = e.code
    return status, out.getvalue(), err.getvalue()


@pytest.fixture
def hf_config(tmp_path) -> Path:
    """The Qwen3-8B config.json as Hugging Face ships it: no Orthrus fields."""
    d = json.loads(QWEN3_8B.read_text())
    del d["mask_token_id"], d["block_size"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    return path


def test_table_for_a_model_folder(tmp_path):
    TINY.save(tmp_path)
    status, out, err = run("--config", tmp_path, "--context", 100)
    assert status == 0, err
    assert "decode batch 1, context 100 (cache 256 positions), block 8" in out
    for row in ("weights", "cache", "activations", "total"):
        assert f"\n  {row} " in out
    assert "fits" not in out


def test_hf_config_fits_or_not_in_a_32gb_device(hf_config):
    status, out, err = run("--config", hf_config, "--dtype", "bfloat16", "--context", 8192,
                           "--device-memory", "32GB")
    assert status == 0, err
    assert "cache 9216 positions), block 32" in out and "  fits in 32.00 GB" in out
    status, out, _ = run("--config", hf_config, "--dtype", "bfloat16", "--context", 8192,
                         "--batch", 8, "--device-memory", "32GB")
    assert status == 0 and "does NOT fit in 32.00 GB" in out


def test_json_is_the_planners_plan(hf_config):
    config = ModelConfig.from_json_file(hf_config)
    status, out, err = run("--config", hf_config, "--dtype", "bfloat16", "--context", 4000,
                           "--max-new-tokens", 500, "--mesh", "data=2,tensor=4", "--batch", 2,
                           "--device-memory", "80GiB", "--json")
    assert status == 0, err
    r = json.loads(out)
    expected = plan_decode(config, dtype="bfloat16", batch=2, context=4000,
                           max_new_tokens=500, mesh={"data": 2, "tensor": 4})
    assert r["per_device"] == expected.per_device and r["devices"] == 8
    assert r["details"]["cache_len"] == 4608 and r["fits"] is True  # 4,499 positions, 9 * 2^9
    assert r["device_memory"] == 80 * 2**30


def test_compute_dtype_is_planned_as_the_engine_holds_it(hf_config):
    config = ModelConfig.from_json_file(hf_config)
    status, out, err = run("--config", hf_config, "--dtype", "bfloat16", "--compute-dtype",
                           "float32", "--context", 4000, "--json")
    assert status == 0, err
    r = json.loads(out)
    expected = plan_decode(config, dtype="bfloat16", compute_dtype="float32", batch=1,
                           context=4000)
    assert r["per_device"] == expected.per_device
    assert r["details"]["compute_dtype"] == "float32" and r["details"]["dtype"] == "bfloat16"
    status, out, _ = run("--config", hf_config, "--dtype", "bfloat16", "--compute-dtype",
                         "float32", "--context", 4000)
    assert status == 0 and "bfloat16 weights, float32 compute" in out


def test_train_plan_as_json(tmp_path):
    TINY.save(tmp_path)
    status, out, err = run("--config", tmp_path, "--train", "--seq-len", 64,
                           "--anchors-per-seq", 4, "--block-size", 4, "--no-remat", "--json")
    assert status == 0, err
    r = json.loads(out)
    expected = plan_train(TINY, dtype="float32", batch=1, seq_len=64, anchors_per_seq=4,
                          block_size=4, remat=False)
    assert r["kind"] == "train" and r["per_device"] == expected.per_device
    assert r["per_device"]["optimizer"] == 2 * r["per_device"]["trainable"]
    assert r["details"]["remat"] is False and "fits" not in r


@pytest.mark.parametrize(("args", "message"), [
    (["--mesh", "model=2"], "argument --mesh: mesh 'model=2': expected AXIS=N"),
    (["--mesh", "data=-1"], "argument --mesh: mesh"),
    (["--device-memory", "lots"], "argument --device-memory: 'lots' is not a size"),
    (["--batch", "0"], "argument --batch: 0 must be >= 1"),
    (["--dtype", "int8"], "argument --dtype: invalid choice"),
    (["--dtype", "float32", "--compute-dtype", "bfloat16"],
     "error: --compute-dtype bfloat16 with float32 weights (--dtype float32)"),
    (["--train", "--compute-dtype", "float32"],
     "error: --compute-dtype plans decoding; a train step computes in --dtype"),
    (["--train", "--seq-len", "16"], "error: --seq-len 16 is below block size + 1 (33)"),
    (["--mesh", "tensor=16"], "('kv_heads', size 8) is not divisible by 16 shards"),
    (["--context", "40960"], "error: context 40960 leaves no room in a cache of 40960"),
])
def test_bad_flags_are_refused_by_name(args, message):
    status, out, err = run("--config", QWEN3_8B, *args)
    assert status == 2 and out == ""
    assert message in err and "Traceback" not in err


def test_bad_config_files_are_named(tmp_path):
    status, _, err = run("--config", tmp_path / "nowhere")
    assert status == 2 and f"error: no config.json at {tmp_path / 'nowhere'}" in err
    broken = tmp_path / "config.json"
    broken.write_text("{not json")
    status, _, err = run("--config", broken)
    assert status == 2 and f"error: {broken}: not valid JSON" in err
