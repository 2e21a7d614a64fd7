"""Training checkpoints: an Orbax ``CheckpointManager`` over ``OUT/checkpoints/<step>/``,
each step holding the train state and a JSON ``meta`` (step, data position, arguments, a
checksum of every state array and a SHA-256 of the meta itself).

Orbax writes a step under a temporary name and renames it when complete, so a run killed
mid-save leaves no step that looks complete. What it does not catch is damage after the
fact: a file deleted or cut, garbled metadata, or a flipped byte inside an array's data,
which Orbax would read back as a different number. :meth:`TrainCheckpoints.restore`
turns every failure into one :class:`~orthrus_jax.cli.InputError` naming the step folder
and the step an earlier checkpoint would resume from, and compares the restored state's
checksums with the saved ones.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from orthrus_jax.checksum import first_mismatch, tree_checksums
from orthrus_jax.cli import InputError, first_line


class TrainCheckpoints:
    """The checkpoints of one training run in ``directory``, the newest ``keep`` kept."""

    def __init__(self, directory: str | Path, keep: int):
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Save ``state`` (asynchronously) and ``meta`` plus the state's checksums."""
        meta = {**meta, "step": step, "checksums": tree_checksums(state)}
        meta["meta_sha256"] = _digest(meta)
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """The state (laid out as ``abstract_state``: ShapeDtypeStructs with shardings) and
        the meta of ``step``; a damaged step is an InputError."""
        where = self.directory / str(step)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    meta=ocp.args.JsonRestore()))
        except Exception as e:  # Orbax/TensorStore raise anything for a damaged step
            raise self._damaged(where, step,
                                f"unreadable ({type(e).__name__}: {first_line(e)})") from e
        meta = restored.meta
        if not isinstance(meta, dict) or meta.get("step") != step \
                or not isinstance(meta.get("data"), dict) \
                or meta.get("meta_sha256", _digest(meta)) != _digest(meta):
            raise self._damaged(where, step, "its meta/metadata is not the one saved with it")
        saved = meta.get("checksums")
        if saved is not None:  # checkpoints written before checksums existed have none
            bad = first_mismatch(saved, tree_checksums(restored.state))
            if bad is not None:
                raise self._damaged(where, step, f"tensor state{bad} does not match the "
                                    "checksum saved with it")
        return restored.state, meta

    def _damaged(self, where: Path, step: int, why: str) -> InputError:
        earlier = [s for s in self._manager.all_steps() if s < step]
        then = (f"move it out of {self.directory} to resume from step {max(earlier)}"
                if earlier else f"move it out of {self.directory} to start over")
        return InputError(f"{where}: damaged training checkpoint: {why}; {then}")

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _digest(meta: dict[str, Any]) -> str:
    """SHA-256 of ``meta`` without its own digest, as canonical JSON."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def abstract_state(state: Any) -> Any:
    """``state`` as ShapeDtypeStructs with its shardings: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)
