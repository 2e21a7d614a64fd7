"""Head files (``convert.head``): the diffusion tensors alone, int8 / bf16 / float32.

- export then apply restores the diffusion tensors (exactly in float32, within the
  quantisation step in int8), the block size and the mask token, and nothing else;
- the CLI's export and apply; the metadata travels;
- wrong backbones, missing or extra tensors, bad scales and non-head files are refused
  with the file and the key in the message, and a failed write leaves no file behind.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from convert import head as H
from orthrus_jax.checkpoint import load_model
from tests.hf_reference import hf_model, tiny_model_dir, to_orthrus


def _trained(seed: int = 0, block_size: int = 4):
    """A tiny model whose diffusion tensors differ from their AR twins."""
    model = to_orthrus(hf_model("qwen3", False, seed=seed), block_size=block_size)
    rng = np.random.default_rng(seed)
    state = nnx.state(model.layers.diff_attn)
    nnx.update(model.layers.diff_attn, jax.tree.map(
        lambda a: a + 0.01 * rng.standard_normal(a.shape).astype(a.dtype), state))
    return model


def _diffusion(model) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model.layers.diff_attn)))


def _backbone(model) -> dict:
    tree = nnx.to_pure_dict(nnx.state(model))
    del tree["layers"]["diff_attn"]
    return jax.tree.map(np.asarray, tree)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_export_then_apply_restores_the_diffusion_tensors(tmp_path, dtype):
    src = _trained(block_size=6)
    path = H.save_head(src, tmp_path / "h.safetensors", dtype=dtype, metadata={"step": 7})
    meta = H.read_head_metadata(path)
    assert meta["block_size"] == 6 and meta["step"] == 7 and meta["dtype"] == dtype
    target = to_orthrus(hf_model("qwen3", False, seed=0), block_size=32)  # untrained copy
    applied = H.apply_head(target, path)
    assert applied.config.block_size == 6
    assert applied.config.mask_token_id == src.config.mask_token_id
    want = jax.tree_util.tree_flatten_with_path(_diffusion(src))[0]
    got = jax.tree.leaves(_diffusion(applied))
    assert len(want) == len(got) > 0
    for (path, a), b in zip(want, got, strict=True):
        if dtype == "float32":
            np.testing.assert_array_equal(a, b)
        else:  # int8: half a step of the largest row scale; bf16: 8 mantissa bits
            tol = np.max(np.abs(a)) / 127 / 2 + 1e-7 if dtype == "int8" else \
                np.max(np.abs(a)) * 2 ** -8
            np.testing.assert_allclose(b, a, atol=tol, err_msg=str(path))
    jax.tree.map(np.testing.assert_array_equal, _backbone(applied), _backbone(target))


def test_int8_file_is_a_quarter_of_float32(tmp_path):
    model = _trained()
    f32 = H.save_head(model, tmp_path / "a.safetensors", dtype="float32").stat().st_size
    i8 = H.save_head(model, tmp_path / "b.safetensors", dtype="int8").stat().st_size
    assert i8 < 0.3 * f32
    raw = load_file(str(tmp_path / "b.safetensors"))
    key = "model.layers.0.self_attn.q_proj_diff.weight"
    assert raw[key].dtype == np.int8 and raw[key + "_scale"].dtype == np.float32


def test_cli_export_and_apply(tmp_path, capsys):
    src = tiny_model_dir(tmp_path / "m", block_size=4, seed=4)
    profile = {"block_size": 4, "accepted_hist": [5, 3, 2, 1], "source": "test"}
    (src / "acceptance.json").write_text(json.dumps(profile))
    head = tmp_path / "head.safetensors"
    assert H.main(["export", str(src), str(head), "--metadata", '{"note": "x"}']) == 0
    meta = H.read_head_metadata(head)
    assert meta["note"] == "x" and meta["acceptance"] == profile  # the folder's profile
    assert H.main(["apply", str(src), str(head), str(tmp_path / "out")]) == 0
    out = load_model(tmp_path / "out")
    assert out.config.block_size == 4 and (tmp_path / "out" / "tokenizer.json").is_file()
    from infer.block_size import AcceptanceProfile  # written back for --block-size auto
    assert AcceptanceProfile.load(tmp_path / "out").accepted_hist == (5, 3, 2, 1)
    assert H.main(["apply", str(src), str(head), str(tmp_path / "out")]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert H.main(["export", str(src), str(head), "--metadata", "[1]"]) == 2
    assert "JSON object" in capsys.readouterr().err


def test_bad_heads_are_refused_by_name(tmp_path):
    model = _trained()
    good = H.save_head(model, tmp_path / "good.safetensors")
    tensors, meta = load_file(str(good)), H.read_head_metadata(good)

    def write(name, t, m):
        path = tmp_path / name
        save_file(t, str(path), metadata={k: json.dumps(v) for k, v in m.items()})
        return path

    other = to_orthrus(hf_model("qwen3", False, seed=0, num_hidden_layers=3), block_size=4)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        H.apply_head(other, good)
    key = "model.layers.1.self_attn.k_proj_diff.weight"
    missing = write("missing.safetensors", {k: v for k, v in tensors.items() if k != key}, meta)
    with pytest.raises(ValueError, match=f"missing.safetensors: tensor {key} is missing"):
        H.apply_head(model, missing)
    extra = write("extra.safetensors", {**tensors, "model.embed_tokens.weight":
                                        np.zeros((2, 2), np.float32)}, meta)
    with pytest.raises(ValueError, match="unexpected tensor.*embed_tokens"):
        H.apply_head(model, extra)
    bad_scale = write("scale.safetensors", {**tensors, key + "_scale": np.ones(3, np.float32)},
                      meta)
    with pytest.raises(ValueError, match=f"{key}_scale has shape"):
        H.apply_head(model, bad_scale)
    plain = write("plain.safetensors", tensors, {"format": "something-else"})
    with pytest.raises(ValueError, match="not an Orthrus head"):
        H.read_head_metadata(plain)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors: not a readable safetensors"):
        H.read_head_metadata(junk)
    with pytest.raises(FileNotFoundError, match="head file not found"):
        H.read_head_metadata(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="--dtype"):
        H.save_head(model, tmp_path / "x.safetensors", dtype="int4")


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(H, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        H.save_head(_trained(), tmp_path / "h.safetensors")
    assert list(tmp_path.iterdir()) == []
