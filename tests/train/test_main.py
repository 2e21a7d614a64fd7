"""``python -m train.main`` end to end: outputs, exact resume, NaN stop, two processes,
and bad input."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from orthrus_jax.checkpoint import load_model
from tests.hf_reference import tiny_model_dir
from train.main import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    tiny_model_dir(d / "model", initializer_range=0.1)
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{i} plus {i} is {2 * i}.\n"
             f"#### {2 * i}"} for i in range(40)]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "eval.jsonl").write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}]}) + "\n"
        for i in range(40, 43)))
    return d


def args(d, out, *extra):
    return ["--model", str(d / "model"), "--data", str(d / "data.jsonl"), "--out", str(out),
            "--batch-size", "4", "--seq-len", "32", "--anchors-per-seq", "8",
            "--mesh", "data=1", "--no-progress", *extra]


def diffusion(folder) -> dict:
    model = load_model(folder)
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model.layers.diff_attn)))


def records(out, event):
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


@pytest.mark.slow
def test_run_writes_metrics_checkpoints_and_a_usable_model(workdir, tmp_path):
    out = tmp_path / "run"
    assert main(args(workdir, out, "--steps", "4", "--save-every", "2", "--eval-prompts",
                     str(workdir / "eval.jsonl"), "--eval-max-new-tokens", "12",
                     "--eval-every", "2", "--mesh", "data=2,tensor=2")) == 0
    train = records(out, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["tokens_per_second"] > 0 and "lr" in r
               and r["positions"] > 0 and r["skipped_sequences"] >= 0 for r in train)
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [0, 2, 4]
    # one engine for the run: the later evaluations compile nothing new
    assert [r["programs_compiled"] for r in evals] == [1, 1, 1]
    from infer.block_size import AcceptanceProfile
    profile = AcceptanceProfile.load(out / "model")  # the final evaluation's, for "auto"
    assert list(profile.accepted_hist) == evals[-1]["accepted_hist"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "4"]
    before, after = diffusion(workdir / "model"), diffusion(out / "model")
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    assert (out / "model" / "tokenizer.json").is_file()
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from convert.head import read_head_metadata
    assert read_head_metadata(out / "head.safetensors")["step"] == 4
    from convert.to_hf import export  # the trained model exports to the HF layout
    export(out / "model", tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()

    # Its head, exported, starts a new run (--init-head) where this one ended.
    from convert.head import save_head
    head = save_head(load_model(out / "model"), tmp_path / "head.safetensors", dtype="float32")
    again = tmp_path / "again"
    assert main(args(workdir, again, "--steps", "1", "--lr", "1e-12", "--init-head",
                     str(head))) == 0
    resumed = diffusion(again / "model")
    for k in after:
        np.testing.assert_allclose(resumed[k], after[k], atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(workdir, tmp_path):
    common = ("--steps", "5", "--save-every", "2", "--mesh", "data=4", "--grad-accum", "2")
    assert main(args(workdir, tmp_path / "straight", *common)) == 0
    assert main(args(workdir, tmp_path / "split", *common, "--stop-after", "3")) == 0
    assert not (tmp_path / "split" / "model").exists()
    assert main(args(workdir, tmp_path / "split", *common, "--resume")) == 0
    a, b = diffusion(tmp_path / "straight" / "model"), diffusion(tmp_path / "split" / "model")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert [r["loss"] for r in records(tmp_path / "straight", "train")][3:] == \
        [r["loss"] for r in records(tmp_path / "split", "train")][3:]
    # killed mid-run: resuming from a periodic checkpoint (step 2 of the straight run,
    # whose data position was saved while step 3's batch was already prepared) is exact
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "straight", killed)
    shutil.rmtree(killed / "model")
    for step in ("4", "5"):
        shutil.rmtree(killed / "checkpoints" / step)
    assert main(args(workdir, killed, *common, "--resume")) == 0
    k = diffusion(killed / "model")
    for key in a:
        np.testing.assert_array_equal(a[key], k[key], err_msg=key)
    # killed after its last checkpoint, before model/ was complete: --resume writes model/
    # from that checkpoint, taking no step
    shutil.rmtree(tmp_path / "split" / "model")
    assert main(args(workdir, tmp_path / "split", *common, "--resume")) == 0
    c = diffusion(tmp_path / "split" / "model")
    for k in a:
        np.testing.assert_array_equal(a[k], c[k], err_msg=k)
    assert len(records(tmp_path / "split", "train")) == 5  # no step taken again


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(workdir, tmp_path,
                                                                      capsys):
    out = tmp_path / "nan"
    code = main(args(workdir, out, "--steps", "5", "--save-every", "1", "--lr", "1e30",
                     "--warmup", "0", "--mesh", "data=1"))
    assert code == 2
    assert "loss is nan at step 2: stopping without saving" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1"]
    assert not (out / "model").exists()


@pytest.mark.parametrize("extra, message", [
    (("--data", "/nonexistent/file.jsonl"), "/nonexistent/file.jsonl"),
    (("--seq-len", "4"), "--seq-len 4 is below block size"),
    (("--mesh", "data=8", "--batch-size", "4"), "--batch-size 4 is not divisible by the mesh"),
])
def test_bad_input_is_a_clear_error(workdir, tmp_path, capsys, extra, message):
    argv = args(workdir, tmp_path / "bad", "--steps", "2")
    for i in range(0, len(extra), 2):  # later flags override earlier ones
        argv += [extra[i], extra[i + 1]]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_malformed_line_names_file_and_line(workdir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "b"}\n{not json\n')
    assert main(args(workdir, tmp_path / "o", "--steps", "1", "--data", str(bad))) == 2
    assert f"{bad}:2" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(workdir, tmp_path):
    """Two processes of 2 CPU devices each (gloo collectives) against one process of 4."""
    common = ["--steps", "3", "--mesh", "data=2,fsdp=2", "--save-every", "3"]

    def launch(out, devices, extra=()):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   JAX_PLATFORMS="cpu")
        return subprocess.Popen([sys.executable, "-m", "train.main",
                                 *args(workdir, out, *common, *extra)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    port = _free_port()
    multi = [launch(tmp_path / "multi", 2, ("--num-processes", "2", "--process-id", str(i),
                                            "--coordinator", f"127.0.0.1:{port}"))
             for i in range(2)]
    single = launch(tmp_path / "single", 4)
    for p in [*multi, single]:
        output, _ = p.communicate(timeout=300)
        assert p.returncode == 0, output
    a, b = diffusion(tmp_path / "multi" / "model"), diffusion(tmp_path / "single" / "model")
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)
    assert len(records(tmp_path / "multi", "train")) == 3
