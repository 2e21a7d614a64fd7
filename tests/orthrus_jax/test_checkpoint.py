"""Model folder format 2: per-layer parameter groups, written a group at a time and read into
the decoder's per-layer form or training's stacked form; format-1 folders still load."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec

from convert.keymap import entries
from convert.model_folder import ConversionError, stream_groups
from infer import generate
from orthrus_jax.checkpoint import (
    FORMAT_FIELD,
    FORMAT_VERSION,
    PARAMS_DIR,
    folder_format,
    load_model,
    read_param_groups,
    save_model,
)
from orthrus_jax.cli import InputError
from orthrus_jax.model import is_unstacked, unstack_layers
from orthrus_jax.sharding import make_mesh
from tests.fuzzing import apply_mutations, byte_mutations
from tests.hf_reference import hf_model, hf_state, to_orthrus


@pytest.fixture(scope="module")
def model():
    return to_orthrus(hf_model("qwen3", seed=3), block_size=4)


def _stacked_params(m) -> dict:
    """Pure dict of ``m`` with per-layer tuples stacked back (for comparison)."""
    return jax.tree.map(lambda a: np.stack(a) if is_unstacked(a) else np.asarray(a),
                        nnx.to_pure_dict(nnx.state(m)), is_leaf=is_unstacked)


def _assert_same(a, b) -> None:
    pa, pb = _stacked_params(a), _stacked_params(b)
    flat_a = jax.tree_util.tree_flatten_with_path(pa)[0]
    flat_b = jax.tree_util.tree_flatten_with_path(pb)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(x, y, err_msg=str(path))


def test_folder_stores_layers_one_by_one_and_loads_in_either_form(model, tmp_path):
    save_model(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config[FORMAT_FIELD] == FORMAT_VERSION == folder_format(tmp_path)
    groups = list(read_param_groups(tmp_path))
    assert [layer for layer, _ in groups] == [None, 0, 1]
    assert ("attn", "q_proj") in groups[1][1] and ("embed_tokens",) in groups[0][1]

    stacked = load_model(tmp_path)
    assert not is_unstacked(stacked.layers.attn.q_proj.get_value())
    per_layer = load_model(tmp_path, per_layer=True)
    q = per_layer.layers.attn.q_proj.get_value()
    assert is_unstacked(q) and len(q) == 2 and q[0].shape == model.layers.attn.q_proj.shape[1:]
    _assert_same(model, stacked)
    _assert_same(model, per_layer)

    # a per-layer model saves to the same folder contents
    (tmp_path / "again").mkdir()
    save_model(per_layer, tmp_path / "again")
    _assert_same(model, load_model(tmp_path / "again"))


def test_models_of_more_than_ten_layers_load_their_layers_in_order(tmp_path):
    """Layer names sort as strings ("10" before "2"): every layer must still come back
    at its own index, in both forms, whether a read holds one layer or several."""
    deep = to_orthrus(hf_model("qwen3", seed=5, num_hidden_layers=12), block_size=4)
    save_model(deep, tmp_path)
    _assert_same(deep, load_model(tmp_path))
    _assert_same(deep, load_model(tmp_path, per_layer=True))
    for i, group in read_param_groups(tmp_path):
        if i is not None:
            expected = np.asarray(deep.layers.mlp.up_proj.get_value()[i])
            np.testing.assert_array_equal(group[("mlp", "up_proj")], expected, err_msg=i)


def test_per_layer_load_places_each_layer_on_its_shard(model, tmp_path):
    save_model(model, tmp_path)
    mesh = make_mesh({"data": 4, "tensor": 2})
    per_layer = load_model(tmp_path, mesh=mesh, per_layer=True)
    stacked = load_model(tmp_path, mesh=mesh)
    spec = stacked.layers.attn.q_proj.get_value().sharding.spec
    for part in per_layer.layers.attn.q_proj.get_value():
        assert part.sharding.spec == PartitionSpec(*spec[1:])
        assert len(part.addressable_shards) == 8


def test_format_1_folders_still_load(model, tmp_path):
    """A folder written before format 2: stacked leaves, v0 Orbax, no format field."""
    model.config.save(tmp_path)
    assert FORMAT_FIELD not in json.loads((tmp_path / "config.json").read_text())
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path.absolute() / PARAMS_DIR, nnx.to_pure_dict(nnx.state(model)))
        ckpt.wait_until_finished()
    assert folder_format(tmp_path) == 1
    _assert_same(model, load_model(tmp_path))
    loaded = load_model(tmp_path, per_layer=True)
    assert is_unstacked(loaded.layers.mlp.up_proj.get_value())
    _assert_same(model, loaded)
    assert [layer for layer, _ in read_param_groups(tmp_path)] == [None, 0, 1]


@pytest.mark.parametrize("version, message", [
    (FORMAT_VERSION + 1, "newer than this orthrus-jax reads"),
    ("2", "is not a format version"),
    (0, "is not a format version"),
])
def test_unknown_format_versions_are_refused(model, tmp_path, version, message):
    save_model(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {FORMAT_FIELD: version}))
    with pytest.raises(InputError, match=f"config.json: .*{message}"):
        load_model(tmp_path)


def test_conversion_yields_each_layer_as_soon_as_it_is_complete(model):
    """The converter holds only unfinished layers: a layer's group comes out before any
    tensor of the next layer is read."""
    hf = hf_model("qwen3", seed=3)
    state = hf_state(hf)
    config = model.config
    order = sorted(state, key=lambda k: (k.count("layers."), k))  # non-layer first
    read: list[str] = []

    def tensors():
        for key in order:
            read.append(key)
            yield key, state[key]

    seen_layers = []
    for group in stream_groups(config, tensors(), {k: v.shape for k, v in state.items()}):
        if "layers" in group:
            (layer,) = group["layers"]
            seen_layers.append(int(layer))
            assert not any(k.startswith(f"model.layers.{int(layer) + 1}.") for k in read)
            # no *_diff in an HF Qwen3: the diffusion view starts as a copy of the AR one
            np.testing.assert_array_equal(group["layers"][layer]["diff_attn"]["q_proj"],
                                          group["layers"][layer]["attn"]["q_proj"])
    assert seen_layers == [0, 1]


def test_conversion_checks_names_and_shapes_before_reading_any_tensor(model):
    state = hf_state(hf_model("qwen3", seed=3))
    keys = {k: v.shape for k, v in state.items()}

    def never():
        raise AssertionError("a tensor was read")
        yield

    wrong = dict(keys, **{"model.layers.1.mlp.up_proj.weight": (3, 3)})
    with pytest.raises(ConversionError, match=r"model.layers.1.mlp.up_proj.weight has shape"):
        next(stream_groups(model.config, never(), wrong))
    missing = {k: v for k, v in keys.items() if "layers.0.mlp" not in k}
    with pytest.raises(ConversionError, match="3 expected tensor.s. missing"):
        next(stream_groups(model.config, never(), missing))
    diff = next(e.hf_key for e in entries(model.config) if e.diffusion)
    with pytest.raises(ConversionError, match="partial diffusion view"):
        next(stream_groups(model.config, never(), dict(keys, **{diff: keys[diff.replace(
            "_diff", "")]})))


def test_a_listed_tensor_that_never_comes_is_an_error(model):
    state = hf_state(hf_model("qwen3", seed=3))
    keys = {k: v.shape for k, v in state.items()}
    short = [(k, v) for k, v in state.items() if k != "model.norm.weight"]
    with pytest.raises(ConversionError, match="listed but never read: model.norm.weight"):
        list(stream_groups(model.config, iter(short), keys))
    twice = [*state.items(), ("model.norm.weight", state["model.norm.weight"])]
    with pytest.raises(ConversionError, match="model.norm.weight appears twice"):
        list(stream_groups(model.config, iter(twice), keys))


def test_unstack_then_save_round_trips(model, tmp_path):
    save_model(unstack_layers(model), tmp_path)
    _assert_same(model, load_model(tmp_path))


def _damage(params, how: str) -> None:
    state = params / "state"
    if how == "manifest deleted":
        (state / "manifest.ocdbt").unlink()
    elif how == "metadata cut":
        data = (state / "_METADATA").read_bytes()
        (state / "_METADATA").write_bytes(data[: len(data) // 2])
    elif how == "array metadata garbled":
        [f] = (state / "array_metadatas").iterdir()
        f.write_bytes(f.read_bytes()[:40] + b"\xff\xfe" + f.read_bytes()[42:])
    elif how == "a layer's database missing":
        shutil.rmtree(sorted(state.glob("ocdbt.process_*"))[-1])
    elif how == "layout marker deleted":
        (params / "_CHECKPOINT_METADATA").unlink()


@pytest.mark.parametrize("how", ["manifest deleted", "metadata cut", "array metadata garbled",
                                 "a layer's database missing", "layout marker deleted"])
def test_a_damaged_checkpoint_is_one_clear_error(model, tmp_path, how):
    save_model(model, tmp_path)
    _damage(tmp_path / PARAMS_DIR, how)
    with pytest.raises(InputError, match=f"{tmp_path / PARAMS_DIR}: unreadable parameter "
                                         "checkpoint .*convert or save the model again"):
        load_model(tmp_path, per_layer=True)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert generate.main(["--model", str(tmp_path), "--prompt-ids", "1,2"]) == 2
    assert err.getvalue().startswith("error: ") and "unreadable parameter checkpoint" in \
        err.getvalue()


# ------------------------------------------------------------------------- checksums

def _data_files(params) -> list:
    """The files holding array data (OCDBT data files), largest first."""
    files = [p for p in params.rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(files, key=lambda p: -p.stat().st_size)


def test_a_flipped_byte_in_array_data_is_caught_by_the_checksums(model, tmp_path):
    save_model(model, tmp_path)
    sums = json.loads((tmp_path / "checksums.json").read_text())
    per_layer = jax.tree.leaves(nnx.to_pure_dict(nnx.state(unstack_layers(model))))
    assert sums["layers.0.attn.q_proj"]["dtype"] == "float32"
    assert len(sums) == len(per_layer)  # every stored tensor
    target = _data_files(tmp_path / PARAMS_DIR)[0]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01  # one low mantissa bit of one weight
    target.write_bytes(bytes(data))
    pattern = f"{tmp_path / PARAMS_DIR}: parameter .* does not match its checksum"
    for per_layer in (False, True):
        with pytest.raises(InputError, match=pattern):
            load_model(tmp_path, per_layer=per_layer)
    with pytest.raises(InputError, match=pattern):
        list(read_param_groups(tmp_path))
    # read in another dtype the values are converted, and no checksum applies
    load_model(tmp_path, param_dtype="bfloat16")


def test_checksum_file_absent_or_damaged(model, tmp_path):
    save_model(model, tmp_path)
    sums = tmp_path / "checksums.json"
    good = sums.read_text()
    sums.unlink()  # folders written before checksums existed
    _assert_same(model, load_model(tmp_path))
    sums.write_text(good[: len(good) // 2])
    with pytest.raises(InputError, match=f"{sums}: unreadable"):
        load_model(tmp_path)
    sums.write_text(json.dumps({"embed_tokens": json.loads(good)["embed_tokens"]}))
    with pytest.raises(InputError, match=f"{sums}: no checksum of parameter"):
        load_model(tmp_path)


FUZZ_EXAMPLES = int(os.environ.get("ORTHRUS_FUZZ_EXAMPLES", "40"))


@pytest.fixture(scope="module")
def saved_folder(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz-model") / "model"
    d.mkdir()
    save_model(model, d)
    return d


@settings(max_examples=FUZZ_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_model_folders_load_the_same_model_or_refuse(model, saved_folder,
                                                           tmp_path_factory, data):
    """Byte damage to any file of ``params/`` or to ``checksums.json``: the folder loads
    the same parameters, or the load is one InputError naming the folder."""
    folder = tmp_path_factory.mktemp("fuzzed") / "model"
    shutil.copytree(saved_folder, folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "config.json")
    target = data.draw(st.sampled_from(files), label="file")
    raw = target.read_bytes()
    if not raw:
        return
    ops = data.draw(byte_mutations(len(raw), min(len(raw) - 1, 64),
                                   [b"\x00" * 4, b"\xff" * 4, b'"', b"{", b"}"]), label="ops")
    target.write_bytes(apply_mutations(raw, ops))
    try:
        loaded = load_model(folder, per_layer=True)
    except InputError as e:
        assert str(e).startswith(str(folder)), e
        return
    _assert_same(model, loaded)
