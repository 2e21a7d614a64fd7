"""Converters killed at random moments (SIGKILL) leave no half-written destination.

Each converter (``convert.from_hf``, ``convert.from_gguf``, ``convert.to_hf``) is run once
uninterrupted to measure its duration ``T``, then started again and killed at times drawn
from a seeded RNG in ``[0.5 s, T]``, plus one kill timed from the moment its staging folder
appears, so that one kill always lands inside the write. Afterwards the destination is
absent, or exactly the folder it replaced (``--force``), or complete and loadable.

A failure names the writer, the seed and the kill time: rerunning reproduces the draw.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orthrus_jax.checkpoint import load_model

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
KILLS = 3  # random kill times per writer
EARLIEST = 0.5  # seconds after the start
MASK_ID = 3


def _env() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
    env.pop("XLA_FLAGS", None)  # one CPU device
    return env


def _cmd(module: str, *args) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def _run(cmd: list[str]) -> float:
    """Run ``cmd`` to the end; its wall time."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, f"{cmd}\n{done.stdout}\n{done.stderr}"
    return time.perf_counter() - t0


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _kill(proc: subprocess.Popen, seconds: float) -> bool:
    """SIGKILL ``proc`` ``seconds`` from now; True when it had already finished."""
    try:
        proc.wait(timeout=max(seconds, 0.0))
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False


def _kill_at(cmd: list[str], seconds: float) -> bool:
    return _kill(_start(cmd), seconds)


def _kill_in_write(cmd: list[str], staging_glob: tuple[Path, str], delay: float) -> bool:
    """Start ``cmd``, wait for a path matching ``staging_glob`` (a staging folder, a first
    checkpoint), kill it ``delay`` seconds later."""
    proc = _start(cmd)
    parent, pattern = staging_glob
    while proc.poll() is None and not any(parent.glob(pattern)):
        time.sleep(0.002)
    return _kill(proc, delay)


def _kill_times(writer: str, duration: float) -> list[tuple[str, float]]:
    """The seeded kill times of ``writer``: ``(label, seconds)``."""
    out = []
    for seed in range(KILLS):
        rng = random.Random(f"{writer}-{seed}")
        out.append((f"{writer} seed={seed}", rng.uniform(EARLIEST, max(duration, EARLIEST))))
    return out


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(dst: Path) -> list[str]:
    return sorted(p.name for p in dst.parent.glob(f".{dst.name}.*"))


def _outcome(dst: Path, old: dict[str, str] | None, finished: bool, check_new, what: str) -> str:
    """Check ``dst`` after a kill and say where the kill landed: before / during / after."""
    leftovers = _leftovers(dst)
    if not dst.exists():
        assert old is None, f"{what}: the existing destination is gone (leftovers {leftovers})"
        state = "absent"
    elif old is not None and _snapshot(dst) == old:
        state = "old"
    else:
        try:
            check_new(dst)
        except Exception as e:  # noqa: BLE001 (the message is the point)
            raise AssertionError(f"{what}: half-written destination {sorted(_snapshot(dst))}: "
                                 f"{type(e).__name__}: {e}") from e
        state = "new"
    assert not (finished and state != "new"), f"{what}: finished but destination is {state}"
    if state == "new":
        return "after"
    return "during" if leftovers else "before"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    from tests.convert.gguf_fixtures import random_hf_state, tiny_config, write_tiny_gguf
    from tests.hf_reference import hf_model, save_hf, tiny_model_dir

    d = tmp_path_factory.mktemp("kill")
    save_hf(hf_model("qwen3"), d / "hf", mask_token_id=MASK_ID)
    config = tiny_config()
    write_tiny_gguf(d / "tiny.gguf", random_hf_state(config), config)
    tiny_model_dir(d / "model", initializer_range=0.1)
    rows = [{"question": f"What is {i} plus {i}?",
             "answer": f"{i} plus {i} is {2 * i}.\n#### {2 * i}"} for i in range(40)]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _check_model_folder(block_size: int):
    def check(dst: Path) -> None:
        model = load_model(dst)
        assert model.config.block_size == block_size, model.config.block_size
    return check


def _check_hf_folder(dst: Path) -> None:
    import transformers

    assert (dst / "model.safetensors.index.json").is_file(), "not the sharded export"
    _, info = transformers.Qwen3ForCausalLM.from_pretrained(dst, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info


WRITERS = {
    # name: (module, source, arguments of the killed runs, check of a complete result)
    "from_hf": ("convert.from_hf", "hf", ("--mask-token-id", MASK_ID, "--block-size", 2),
                _check_model_folder(2)),
    "from_gguf": ("convert.from_gguf", "tiny.gguf",
                  ("--mask-token-id", MASK_ID, "--block-size", 2), _check_model_folder(2)),
    "to_hf": ("convert.to_hf", "model", ("--max-shard-size", "20KB"), _check_hf_folder),
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_killed_converter_leaves_its_destination_whole_or_untouched(writer, sources,
                                                                     tmp_path):
    module, src, killed_args, check_new = WRITERS[writer]
    # The uninterrupted run: its duration, and the folder the --force runs replace.
    previous = tmp_path / "previous"
    base = _cmd(module, sources / src, previous)
    duration = _run(base + ([] if writer == "to_hf" else ["--mask-token-id", str(MASK_ID)]))
    old = _snapshot(previous)

    rng = random.Random(f"{writer}-write")
    plans = [(label, t, None) for label, t in _kill_times(writer, duration)]
    plans.append((f"{writer} in-write", None, rng.uniform(0.0, 0.3)))
    seen = []
    for i, (label, at, delay) in enumerate(plans):
        dst = tmp_path / f"out{i}"
        force = i % 2 == 1  # every other run replaces an existing folder
        if force:
            shutil.copytree(previous, dst)
        cmd = _cmd(module, sources / src, dst, *killed_args, *(["--force"] if force else []))
        if at is not None:
            finished = _kill_at(cmd, at)
            what = f"{label} killed at {at:.3f} s of {duration:.3f} s (force={force})"
        else:
            finished = _kill_in_write(cmd, (tmp_path, f".{dst.name}.partial-*"), delay)
            what = f"{label} killed {delay:.3f} s into the write (force={force})"
        where = _outcome(dst, old if force else None, finished, check_new, what)
        seen.append(f"{what}: {where}")
    print("\n".join(seen))


# ------------------------------------------------------------------------ train.main

TRAIN_STEPS = 6
TRAIN_SEEDS = 2  # killed-and-resumed runs, each killed twice


def _train_cmd(sources: Path, out: Path, resume: bool) -> list[str]:
    return _cmd("train.main", "--model", sources / "model", "--data", sources / "data.jsonl",
                "--out", out, "--batch-size", 4, "--seq-len", 32, "--anchors-per-seq", 8,
                "--mesh", "data=1", "--no-progress", "--steps", TRAIN_STEPS,
                "--save-every", 1, "--keep", 2, *(["--resume"] if resume else []))


def _diffusion_tensors(model_dir: Path) -> dict[str, bytes]:
    from flax import nnx

    state = nnx.state(load_model(model_dir).layers.diff_attn)
    return {str(k): bytes(memoryview(v.get_value())) for k, v in
            nnx.to_flat_state(state)}


def _kill_after_step(cmd: list[str], checkpoints: Path, step: int, delay: float) -> bool:
    """Start ``cmd``; kill it ``delay`` s after a checkpoint folder (complete or still
    being written) of step >= ``step`` appears: inside a save or the steps after it."""
    proc = _start(cmd)

    def reached() -> bool:
        names = [p.name.split(".")[0] for p in checkpoints.glob("*")] \
            if checkpoints.is_dir() else []
        return any(n.isdigit() and int(n) >= step for n in names)

    while proc.poll() is None and not reached():
        time.sleep(0.002)
    return _kill(proc, delay)


def test_a_killed_training_run_resumes_exactly(sources, tmp_path):
    """``train.main`` killed twice at seeded moments around its checkpoints (mid-save,
    mid-step), then resumed with ``--resume`` until done: the final diffusion tensors equal
    an uninterrupted run's bit for bit."""
    _run(_train_cmd(sources, tmp_path / "straight", resume=False))
    expected = _diffusion_tensors(tmp_path / "straight" / "model")
    seen = []
    for seed in range(TRAIN_SEEDS):
        rng = random.Random(f"train-{seed}")
        out = tmp_path / f"killed{seed}"
        kills = sorted(rng.sample(range(1, TRAIN_STEPS + 1), 2))
        for attempt, step in enumerate(kills):
            delay = rng.uniform(0.0, 0.5)
            finished = _kill_after_step(_train_cmd(sources, out, resume=attempt > 0),
                                        out / "checkpoints", step, delay)
            steps = sorted(p.name for p in (out / "checkpoints").glob("*"))
            seen.append(f"seed {seed}: killed {delay:.3f} s after step {step}'s checkpoint "
                        f"appeared (finished={finished}); checkpoints then: {steps}")
        _run(_train_cmd(sources, out, resume=True))
        got = _diffusion_tensors(out / "model")
        different = [k for k in expected if got.get(k) != expected[k]]
        assert not different, f"seed {seed}: resumed run differs in {different}\n" + \
            "\n".join(seen)
    print("\n".join(seen))
