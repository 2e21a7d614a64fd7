"""Training checkpoints (``train.checkpoints``): a damaged step is one clear error naming
it and the step to fall back to; a flipped byte in array data is caught by the checksums;
byte-level fuzzing of every file of a step either restores the same state or refuses."""

import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orthrus_jax.cli import InputError
from tests.fuzzing import apply_mutations, byte_mutations
from train.checkpoints import TrainCheckpoints, abstract_state

EXAMPLES = int(os.environ.get("ORTHRUS_FUZZ_EXAMPLES", "60"))


def _state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"step": jnp.int32(seed), "w": jnp.asarray(rng.normal(size=(16, 24)), jnp.float32),
            "opt": {"mu": jnp.asarray(rng.normal(size=(24,)), jnp.bfloat16),
                    "count": jnp.asarray([seed, 2 * seed], jnp.int32)}}


def _same(a, b) -> bool:
    return all(x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """Checkpoints of steps 1 and 2 (step s holds ``_state(s)``)."""
    d = tmp_path_factory.mktemp("ckpt") / "checkpoints"
    ckpts = TrainCheckpoints(d, keep=3)
    for step in (1, 2):
        ckpts.save(step, _state(step), {"data": {"position": step}})
    ckpts.wait_until_finished()
    ckpts.close()
    return d


def _copy(saved: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "checkpoints"
    shutil.copytree(saved, dst)
    return dst


def _restore(directory: Path, step: int = 2):
    ckpts = TrainCheckpoints(directory, keep=3)
    try:
        return ckpts.restore(step, abstract_state(_state(step)))
    finally:
        ckpts.close()


def test_a_saved_step_restores_exactly(saved, tmp_path):
    state, meta = _restore(_copy(saved, tmp_path))
    assert _same(state, _state(2))
    assert meta["step"] == 2 and meta["data"] == {"position": 2} and meta["checksums"]


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _data_file(step: Path) -> Path:
    """The largest array-data file of the state (the 16 x 24 float32 array's chunk)."""
    return max((p for p in (step / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)


def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


DAMAGE = {
    "meta deleted": (lambda s: (s / "meta" / "metadata").unlink(),
                     "unreadable (FileNotFoundError"),
    "meta not JSON": (lambda s: (s / "meta" / "metadata").write_text("{not json"),
                      "unreadable (JSONDecodeError"),
    "meta of another step": (lambda s: (s / "meta" / "metadata").write_text(
        '{"step": 7, "data": {}}'), "its meta/metadata is not the one saved with it"),
    "meta's data position edited": (lambda s: (s / "meta" / "metadata").write_text(
        (s / "meta" / "metadata").read_text().replace('"position": 2', '"position": 3')),
        "its meta/metadata is not the one saved with it"),
    "state manifest deleted": (lambda s: (s / "state" / "manifest.ocdbt").unlink(),
                               "unreadable ("),
    "state metadata cut": (lambda s: _cut(s / "state" / "_METADATA"), "unreadable ("),
    "state folder deleted": (lambda s: shutil.rmtree(s / "state"),
                             "Item \"state\" was not found"),
    "step folder emptied": (lambda s: (shutil.rmtree(s), s.mkdir()), "unreadable (KeyError"),
    "a byte of array data flipped": (lambda s: _flip_middle(_data_file(s)),
                                     "does not match the checksum saved with it"),
}


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_damaged_step_is_one_clear_error(saved, tmp_path, how):
    directory = _copy(saved, tmp_path)
    damage, message = DAMAGE[how]
    damage(directory / "2")
    with pytest.raises(InputError) as raised:
        _restore(directory)
    text = str(raised.value)
    assert text.startswith(f"{directory / '2'}: damaged training checkpoint: "), text
    assert message in text, text
    assert text.endswith(f"move it out of {directory} to resume from step 1"), text
    # as it says: without the damaged step, the previous one restores
    shutil.move(directory / "2", tmp_path / "set-aside")
    state, _ = _restore(directory, step=1)
    assert _same(state, _state(1))


def test_checkpoints_without_checksums_still_restore(saved, tmp_path):
    """Steps saved before checksums existed (no ``checksums`` in meta) restore unchecked."""
    import json

    directory = _copy(saved, tmp_path)
    meta_file = directory / "2" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    del meta["checksums"], meta["meta_sha256"]
    meta_file.write_text(json.dumps(meta))
    state, _ = _restore(directory)
    assert _same(state, _state(2))


def _files(step: Path) -> list[Path]:
    return sorted(p for p in step.rglob("*") if p.is_file())


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_steps_restore_the_same_state_or_refuse(saved, tmp_path_factory, data):
    directory = _copy(saved, tmp_path_factory.mktemp("fuzz"))
    files = _files(directory / "2")
    target = data.draw(st.sampled_from(files), label="file")
    raw = target.read_bytes()
    if not raw:
        return
    ops = data.draw(byte_mutations(len(raw), min(len(raw) - 1, 64), [b"\x00" * 4, b"\xff" * 4,
                                                                    b'"', b"{", b"}"]),
                    label="mutations")
    target.write_bytes(apply_mutations(raw, ops))
    try:
        state, meta = _restore(directory)
    except InputError as e:
        assert str(e).startswith(f"{directory / '2'}: damaged training checkpoint"), e
        return
    assert _same(state, _state(2)), f"{target.relative_to(directory)} {ops}: restored " \
        "a different state without an error"
    assert meta["data"] == {"position": 2}
