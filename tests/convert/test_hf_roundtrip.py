"""``convert.from_hf`` and ``convert.to_hf``: layouts, round trips and bad input."""

import json
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import transformers
from safetensors import safe_open
from safetensors.numpy import save_file

from convert import from_hf, to_hf
from orthrus_jax.cache import init_cache
from orthrus_jax.checkpoint import load_model
from orthrus_jax.model import split_trainable
from tests.hf_reference import hf_config_dict, hf_logits, hf_model, hf_state

DIFF_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")


def read_dir(path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            for k in st.keys():  # noqa: SIM118
                out[k] = st.get_tensor(k)
    return out


def write_checkpoint(path, config: dict, tensors: dict[str, np.ndarray], shards: int = 1):
    """An HF checkpoint folder; with ``shards`` > 1, split with an index file."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    keys = list(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
        return path
    weight_map = {}
    for i, part in enumerate(np.array_split(np.arange(len(keys)), shards)):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({keys[j]: tensors[keys[j]] for j in part}, str(path / name))
        weight_map.update({keys[j]: name for j in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


def orthrus_checkpoint(tmp_path, tied=False, shards=3):
    """A Qwen3 checkpoint in the released Orthrus layout: *_diff tensors of their own."""
    hf = hf_model("qwen3", tied=tied, seed=1)
    tensors = hf_state(hf)
    if tied:
        tensors.pop("lm_head.weight", None)
    rng = np.random.default_rng(0)
    for key in list(tensors):
        for name in DIFF_SUFFIXES:
            marker = f"self_attn.{name}."
            if marker in key:
                new = key.replace(marker, f"self_attn.{name}_diff.")
                tensors[new] = rng.standard_normal(tensors[key].shape).astype(np.float32)
    config = hf_config_dict(hf, architectures=["OrthrusLM"], block_size=8, mask_token_id=5)
    src = write_checkpoint(tmp_path / "src", config, tensors, shards)
    (src / "tokenizer_config.json").write_text('{"chat_template": "x"}')
    return hf, src, tensors


def no_leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")] == []


@pytest.mark.parametrize("tied", [False, True])
def test_orthrus_layout_round_trip_is_bit_exact(tmp_path, tied):
    hf, src, tensors = orthrus_checkpoint(tmp_path, tied)
    assert from_hf.main([str(src), str(tmp_path / "dst")]) == 0
    model = load_model(tmp_path / "dst")
    assert (model.config.block_size, model.config.mask_token_id) == (8, 5)
    assert (tmp_path / "dst" / "tokenizer_config.json").read_text() == '{"chat_template": "x"}'
    _, diffusion, _ = split_trainable(model)
    q_diff = np.asarray(diffusion["layers"]["diff_attn"]["q_proj"][...])
    np.testing.assert_array_equal(q_diff[1].reshape(64, -1).T,
                                  tensors["model.layers.1.self_attn.q_proj_diff.weight"])
    assert to_hf.main([str(tmp_path / "dst"), str(tmp_path / "out")]) == 0
    out = read_dir(tmp_path / "out")
    assert set(out) == set(tensors)
    for key, value in tensors.items():
        assert out[key].dtype == np.float32
        np.testing.assert_array_equal(out[key], value, err_msg=key)
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()


@pytest.mark.slow
def test_plain_checkpoint_gets_diffusion_copies_and_transformers_reads_export(tmp_path):
    hf = hf_model("qwen3", tied=False, seed=2)
    hf.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    assert from_hf.main([str(tmp_path / "src"), str(tmp_path / "dst"),
                         "--mask-token-id", "7", "--block-size", "4"]) == 0
    model = load_model(tmp_path / "dst")
    _, diffusion, backbone = split_trainable(model)
    for name in DIFF_SUFFIXES:
        np.testing.assert_array_equal(np.asarray(diffusion["layers"]["diff_attn"][name][...]),
                                      np.asarray(backbone["layers"]["attn"][name][...]))
    tokens = np.random.default_rng(0).integers(0, 512, (1, 10))
    logits, _ = model(jnp.asarray(tokens), init_cache(model.config, 1, 10))
    assert np.abs(np.asarray(logits) - hf_logits(hf, tokens)).max() <= 1e-4

    assert to_hf.main([str(tmp_path / "dst"), str(tmp_path / "out"),
                       "--max-shard-size", "200KB"]) == 0
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert "model.layers.0.self_attn.q_norm_diff.weight" in read_dir(tmp_path / "out")
    reloaded = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(hf, tokens))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["block_size"] == 4 and cfg["mask_token_id"] == 7


def test_bfloat16_conversion_and_export(tmp_path):
    _, src, tensors = orthrus_checkpoint(tmp_path, shards=1)
    assert from_hf.main([str(src), str(tmp_path / "dst"), "--dtype", "bfloat16"]) == 0
    model = load_model(tmp_path / "dst")
    assert model.embed_tokens[...].dtype == jnp.bfloat16
    assert model.config.dtype == "bfloat16"
    assert to_hf.main([str(tmp_path / "dst"), str(tmp_path / "out")]) == 0
    out = read_dir(tmp_path / "out")
    key = "model.layers.0.mlp.up_proj.weight"
    assert out[key].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(out[key], tensors[key].astype(ml_dtypes.bfloat16))
    # float32 compute on bfloat16 storage, chosen at load time
    assert load_model(tmp_path / "dst", param_dtype="float32").config.dtype == "float32"


@pytest.mark.parametrize("config_dtype", ["bfloat16", None])
def test_bfloat16_checkpoint_stays_bfloat16_unless_dtype_given(tmp_path, config_dtype):
    """The default keeps the stored dtype: config.json's, else the tensors' own."""
    _, src, tensors = orthrus_checkpoint(tmp_path, shards=1)
    config = json.loads((src / "config.json").read_text())
    config.pop("torch_dtype", None)
    config.pop("dtype", None)
    if config_dtype:
        config["dtype"] = config_dtype
    (src / "model.safetensors").unlink()
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    write_checkpoint(src, config, bf16)

    assert from_hf.main([str(src), str(tmp_path / "dst")]) == 0
    model = load_model(tmp_path / "dst")
    assert model.config.param_dtype == "bfloat16" and model.config.dtype == "bfloat16"
    assert model.embed_tokens[...].dtype == jnp.bfloat16
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["dtype"] == "bfloat16"

    assert from_hf.main([str(src), str(tmp_path / "f32"), "--dtype", "float32"]) == 0
    model = load_model(tmp_path / "f32")
    assert model.config.param_dtype == "float32"
    assert model.embed_tokens[...].dtype == jnp.float32
    key = "model.layers.0.mlp.up_proj.weight"
    assert to_hf.main([str(tmp_path / "f32"), str(tmp_path / "out")]) == 0
    out = read_dir(tmp_path / "out")
    assert out[key].dtype == np.float32
    np.testing.assert_array_equal(out[key], bf16[key].astype(np.float32))


def test_help_says_the_default_dtype_is_as_stored(capsys):
    with pytest.raises(SystemExit):
        from_hf.main(["--help"])
    assert "as stored" in " ".join(capsys.readouterr().out.split())


def test_llama_tied_round_trip(tmp_path):
    hf = hf_model("llama", tied=True, seed=3)
    hf.save_pretrained(tmp_path / "src")
    assert from_hf.main([str(tmp_path / "src"), str(tmp_path / "dst"),
                         "--mask-token-id", "3"]) == 0
    assert to_hf.main([str(tmp_path / "dst"), str(tmp_path / "out")]) == 0
    out = read_dir(tmp_path / "out")
    ref = hf_state(hf)
    assert "lm_head.weight" not in out
    for key, value in out.items():
        if "_diff" not in key:
            np.testing.assert_array_equal(value, ref[key], err_msg=key)
    tokens = np.random.default_rng(1).integers(0, 512, (1, 6))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(hf, tokens))


# ---------------------------------------------------------------------------- bad input


def broken(tmp_path, mutate):
    _, src, tensors = orthrus_checkpoint(tmp_path, shards=1)
    config = json.loads((src / "config.json").read_text())
    mutate(config, tensors)
    (src / "model.safetensors").unlink()
    return write_checkpoint(src, config, tensors)


@pytest.mark.parametrize("mutate, message", [
    (lambda c, t: t.pop("model.layers.1.mlp.up_proj.weight"),
     "missing: model.layers.1.mlp.up_proj.weight"),
    (lambda c, t: t.update({"model.norm.weight": np.ones(65, np.float32)}),
     r"tensor model.norm.weight has shape \(65,\), expected \(64,\)"),
    (lambda c, t: t.pop("model.layers.0.self_attn.k_norm_diff.weight"),
     "partial diffusion view: 1 \\*_diff tensor\\(s\\) missing: "
     "model.layers.0.self_attn.k_norm_diff.weight"),
    (lambda c, t: c.update(model_type="gemma"), "model_type='gemma' is not supported"),
    (lambda c, t: c.update(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
     "rope_scaling.rope_type='dynamic' is not implemented"),
    (lambda c, t: c.update(use_sliding_window=True), "use_sliding_window=True"),
    (lambda c, t: c.pop("mask_token_id"), "has no mask_token_id: pass --mask-token-id"),
])
def test_bad_checkpoints_name_the_problem_and_leave_nothing(tmp_path, mutate, message):
    src = broken(tmp_path, mutate)
    with pytest.raises(ValueError, match=message) as raised:
        from_hf.convert(src, tmp_path / "dst")
    assert str(raised.value).startswith(str(src)), raised.value  # the place comes first
    assert not (tmp_path / "dst").exists() and no_leftovers(tmp_path, "dst")


def test_unused_tensors_are_reported(tmp_path, capsys):
    src = broken(tmp_path, lambda c, t: t.update({"model.extra.weight": np.ones(2, np.float32)}))
    from_hf.convert(src, tmp_path / "dst")
    assert "1 unused tensor(s) in the checkpoint: model.extra.weight" in capsys.readouterr().err


def test_missing_files_and_truncated_safetensors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        (tmp_path / "empty").mkdir()
        from_hf.convert(tmp_path / "empty", tmp_path / "dst")
    _, src, _ = orthrus_checkpoint(tmp_path, shards=2)
    shard = src / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{shard}: unreadable safetensors file"):
        from_hf.convert(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists() and no_leftovers(tmp_path, "dst")
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="lists missing shard"):
        from_hf.convert(src, tmp_path / "dst")


def test_existing_destination_is_kept_unless_forced_and_survives_a_failed_force(tmp_path):
    _, src, _ = orthrus_checkpoint(tmp_path, shards=1)
    dst = tmp_path / "dst"
    from_hf.convert(src, dst)
    before = sorted(p.name for p in dst.rglob("*"))
    with pytest.raises(FileExistsError, match="already exists"):
        from_hf.convert(src, dst)
    bad = broken(tmp_path / "b", lambda c, t: t.pop("model.norm.weight"))
    with pytest.raises(ValueError, match="model.norm.weight"):
        from_hf.convert(bad, dst, force=True)
    assert sorted(p.name for p in dst.rglob("*")) == before
    load_model(dst)  # still a whole, loadable model
    from_hf.convert(src, dst, force=True, block_size=16)
    assert load_model(dst).config.block_size == 16 and no_leftovers(tmp_path, "dst")


@pytest.mark.slow
def test_cli_reports_errors_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "convert.from_hf", str(tmp_path / "nope"),
                             str(tmp_path / "dst")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'nope'} is not a folder"


def test_load_model_rejects_a_checkpoint_that_does_not_match_its_config(tmp_path):
    _, src, _ = orthrus_checkpoint(tmp_path, shards=1)
    from_hf.convert(src, tmp_path / "dst")
    cfg = json.loads((tmp_path / "dst" / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (tmp_path / "dst" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"layers.0.mlp.down_proj has shape \(128, 64\), "
                                         r"config.json implies \(96, 64\)"):
        load_model(tmp_path / "dst")
    with pytest.raises(FileNotFoundError, match="no parameter checkpoint"):
        load_model(tmp_path)

