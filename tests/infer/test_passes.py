"""``python -m infer.passes``: the passes timed alone against the memory floor."""

from __future__ import annotations

import contextlib
import io
import json

import jax
import pytest
from flax import nnx

from infer import passes
from orthrus_jax.cache import init_cache
from orthrus_jax.checkpoint import load_model, save_model
from tests.hf_reference import hf_model, to_orthrus


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    save_model(to_orthrus(hf_model("llama", True, seed=1), block_size=4), path)
    return path


def run(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = passes.main([str(a) for a in args])
        except SystemExit as e:  # argparse's refusals
            status = e.code
    return status, out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_model_folder_and_random_config_give_every_pass(model_dir, tmp_path):
    status, out, err = run("--model", model_dir, "--context", 40, "--repeats", 2,
                           "--copy-mib", 8, "--json")
    assert status == 0, err
    r = json.loads(out)
    assert r["context"] == 40 and r["block_size"] == 4 and r["copy_bandwidth_gb_s"] > 0
    assert r["projections"] == "out-in"  # the decoder's form on CPU
    assert set(r["passes"]) == {"ar_step", "diffusion_pass@4", "verify_pass@4"}
    for p in r["passes"].values():
        assert p["seconds"] > 0 and p["floor_seconds"] > 0
        assert p["ratio_to_floor"] == pytest.approx(p["seconds"] / p["floor_seconds"])
    # A random model of the folder's shape, at another block size, in bfloat16.
    config = tmp_path / "config.json"
    config.write_text((model_dir / "config.json").read_text())
    status, out, err = run("--config", config, "--block-size", 8, "--dtype", "bfloat16",
                           "--context", 16, "--repeats", 1, "--copy-mib", 8,
                           "--projections", "in-out", "--json")
    assert status == 0, err
    r = json.loads(out)
    assert r["block_size"] == 8 and r["dtype"] == "bfloat16" and r["projections"] == "in-out"
    assert "diffusion_pass@8" in r["passes"]


def test_several_contexts_are_timed_in_one_run(model_dir):
    status, out, err = run("--model", model_dir, "--context", "40,16", "--repeats", 2,
                           "--copy-mib", 8, "--json")
    assert status == 0, err
    r = json.loads(out)
    assert r["contexts"] == [40, 16] and set(r["passes"]) == {"40", "16"}
    model = load_model(model_dir)
    bandwidth = r["copy_bandwidth_gb_s"] * 1e9
    for ctx, by_pass in r["passes"].items():
        assert set(by_pass) == {"ar_step", "diffusion_pass@4", "verify_pass@4"}
        for name, p in by_pass.items():
            assert p["seconds"] > 0
            assert p["relative_to_first_context"] == pytest.approx(
                p["seconds"] / r["passes"]["40"][name]["seconds"])
            view = "diff_attn" if name.startswith("diffusion_pass") else "attn"
            cache = init_cache(model.config, 1, 1)
            assert p["floor_seconds"] == pytest.approx(
                passes.bytes_read(model, view, cache, int(ctx)) / bandwidth)
    assert all(p["relative_to_first_context"] == 1 for p in r["passes"]["40"].values())
    status, out, err = run("--model", model_dir, "--context", "16,40", "--repeats", 1,
                           "--copy-mib", 8)
    assert status == 0, err
    assert "context 16, 40" in out and "x first" in out and out.count("verify_pass") == 2
    # the decode loop beside its passes, in every context
    assert out.count("decode loop, block") == 2 and "x passes" in out
    # the passes alone (no loop), several contexts
    status, out, err = run("--model", model_dir, "--context", "16,40", "--repeats", 1,
                           "--copy-mib", 8, "--loop-steps", 0)
    assert status == 0, err
    assert out.count("verify_pass") == 2 and "decode loop" not in out


def test_the_loop_is_timed_beside_its_passes(model_dir):
    """Per block size: the compiled loop's iteration and its two passes, measured in the
    same rounds; the loop's program is the engine's (greedy, one size) and commits
    ``loop_steps`` iterations per call."""
    status, out, err = run("--model", model_dir, "--context", 24, "--blocks", "2,4",
                           "--repeats", 2, "--copy-mib", 8, "--loop-steps", 3, "--json")
    assert status == 0, err
    r = json.loads(out)
    assert r["blocks"] == [2, 4] and r["loop_steps"] == 3
    assert set(r["passes"]) == {"ar_step", "diffusion_pass@2", "verify_pass@2",
                                "diffusion_pass@4", "verify_pass@4"}
    assert set(r["iterations"]) == {"1", "2", "4"}
    for k, it in r["iterations"].items():
        passes_s = (r["passes"]["ar_step"]["seconds"] if k == "1" else
                    r["passes"][f"diffusion_pass@{k}"]["seconds"]
                    + r["passes"][f"verify_pass@{k}"]["seconds"])
        assert it["passes_seconds"] == pytest.approx(passes_s)
        assert it["iteration_to_passes"] == pytest.approx(it["iteration_seconds"] / passes_s)
        assert it["iteration_seconds"] > 0
    # one loop call runs its steps: the state it leaves has advanced that many iterations
    model = load_model(model_dir, per_layer=True)
    call = passes.time_loop(model, init_cache(model.config, 1, 28, per_layer=True), 4, 3)
    assert call.steps == 3
    tokens = call()
    assert tokens.shape == (1, 13)
    status, _, err = run("--model", model_dir, "--blocks", "1,4")
    assert status == 2 and "block sizes are >= 2" in err


def test_trees_are_timed_beside_the_chain(model_dir):
    """``--tree-budgets``: each tree's verify pass (``N + 1`` rows, against the AR step) and
    the loop verifying such trees at the largest block, beside its two passes."""
    status, out, err = run("--model", model_dir, "--context", 24, "--blocks", "4",
                           "--tree-budgets", "3,6", "--repeats", 2, "--copy-mib", 8,
                           "--loop-steps", 2, "--json")
    assert status == 0, err
    r = json.loads(out)
    assert r["tree_budgets"] == [3, 6]
    ar = r["passes"]["ar_step"]["seconds"]
    for n in (3, 6):
        p = r["passes"][f"tree_verify_pass@{n}"]
        assert p["seconds"] > 0 and p["to_ar_step"] == pytest.approx(p["seconds"] / ar)
        it = r["iterations"][f"4/tree{n}"]
        both = r["passes"]["diffusion_pass@4"]["seconds"] + p["seconds"]
        assert it["passes_seconds"] == pytest.approx(both) and it["iteration_seconds"] > 0
    # the loop's program verifies trees: a call commits its steps
    model = load_model(model_dir, per_layer=True)
    call = passes.time_loop(model, init_cache(model.config, 1, 28, per_layer=True), 4, 3, 6)
    assert call.steps == 3 and call().shape == (1, 13)
    status, _, err = run("--model", model_dir, "--tree-budgets", "3,300")
    assert status == 2 and "tree budgets from 1 to 255" in err


def test_passes_take_turns():
    """Every round runs each call once, in turn: a slow spell hits all of them alike."""
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in "abc"}
    medians = passes._interleaved_medians(calls, repeats=3)
    assert order == list("abc") * 4 and set(medians) == set("abc")


def test_bytes_read_counts_one_view_the_head_and_the_cache(model_dir):
    model = load_model(model_dir)
    c = model.config
    cache = init_cache(c, 2, 64)
    ar, diff = (passes.bytes_read(model, v, cache, 10) for v in ("attn", "diff_attn"))
    assert ar == diff  # the diffusion view has the AR view's shapes
    kv = 2 * c.num_hidden_layers * 2 * 10 * c.num_key_value_heads * c.head_dim * 4
    assert passes.bytes_read(model, "attn", cache, 20) - ar == kv
    total = sum(a.size * 4 for a in jax.tree.leaves(nnx.state(model)))
    attn = sum(a.size * 4 for a in jax.tree.leaves(nnx.state(model.layers.attn)))
    assert ar - passes.bytes_read(model, "attn", cache, 0) == kv
    assert passes.bytes_read(model, "attn", cache, 0) == total - attn  # all but the other view


@pytest.mark.parametrize("args, message", [
    (("--context", "100000"), "max_position_embeddings"),
    (("--context", "16,100000"), "max_position_embeddings"),
    (("--context", "16,x"), "argument --context: 'x' is not an integer"),
    (("--context", "16,0"), "argument --context: 0 must be >= 1"),
    (("--context", "16,16"), "argument --context: '16,16': a context is repeated"),
])
def test_bad_input(model_dir, args, message):
    status, out, err = run("--model", model_dir, *args)
    assert status == 2 and message in err and out == ""


def test_missing_config(tmp_path):
    status, _, err = run("--config", tmp_path / "nope.json")
    assert status == 2 and "nope.json" in err

