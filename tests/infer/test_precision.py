"""``--compute-dtype``: bfloat16 weights with float32 activations, KV cache and accumulation
(the fidelity option), against plain bfloat16 and a float32 model of the same weights."""

from __future__ import annotations

import contextlib
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infer import bench, generate
from infer.engine import Generator, check_dtypes
from infer.serve import cli as serve
from orthrus_jax.cache import init_cache
from orthrus_jax.checkpoint import load_model, save_model
from tests.hf_reference import hf_model, to_orthrus

BLOCK = 4
PROMPTS = [[5, 9, 17, 3, 80], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [200, 201]]
step = jax.jit(lambda m, t, c: m(t, c))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Qwen3 stored in float32 (no tokenizer: prompts as ids)."""
    path = tmp_path_factory.mktemp("tiny")
    save_model(to_orthrus(hf_model("qwen3", False, seed=5), block_size=BLOCK), path)
    return path


@pytest.fixture(scope="module")
def engines(model_dir):
    return {"option": Generator.load(model_dir, dtype="bfloat16", compute_dtype="float32"),
            "plain": Generator.load(model_dir, dtype="bfloat16")}


def float_dtypes(model) -> set:
    return {a.dtype for a in jax.tree.leaves(nnx.state(model))
            if jnp.issubdtype(a.dtype, jnp.floating)}


def logits(model, tokens: np.ndarray) -> np.ndarray:
    cache = init_cache(model.config, tokens.shape[0], tokens.shape[1])
    out, _ = step(model, jnp.asarray(tokens), cache)
    return np.asarray(out)


def test_the_option_holds_bfloat16_weights_and_a_float32_cache(engines):
    option, plain = engines["option"], engines["plain"]
    assert (option.config.param_dtype, option.config.dtype) == ("bfloat16", "float32")
    assert (plain.config.param_dtype, plain.config.dtype) == ("bfloat16", "bfloat16")
    assert float_dtypes(option.model) == float_dtypes(plain.model) == {jnp.dtype(jnp.bfloat16)}
    for gen, dtype in ((option, jnp.float32), (plain, jnp.bfloat16)):
        gen.generate(PROMPTS[:1], mode="ar", max_new_tokens=2, eos_ids=[-1])
        caches = [start_c.out_info.cache for start_c, _ in gen._compiled.values()]
        assert caches and all(a.dtype == dtype for c in caches for a in jax.tree.leaves((c.k, c.v)))
    assert option.memory_report()["weight_bytes"] == plain.memory_report()["weight_bytes"]
    assert option.describe_dtypes() == "bfloat16 weights, float32 compute"
    assert plain.describe_dtypes() == "bfloat16"


def test_the_option_computes_what_float32_computes_on_the_rounded_weights(model_dir, engines):
    reference = load_model(model_dir, param_dtype="float32", per_layer=True)
    state = nnx.state(reference)
    nnx.update(reference, jax.tree.map(
        lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)
        if jnp.issubdtype(a.dtype, jnp.floating) else a, state))
    tokens = np.random.default_rng(0).integers(0, 512, (2, 12))
    ref = logits(reference, tokens)
    scale = np.abs(ref).max()
    option = np.abs(logits(engines["option"].model, tokens) - ref).max()
    plain = np.abs(logits(engines["plain"].model, tokens) - ref).max()
    assert option <= 1e-5 * max(scale, 1.0), option
    assert plain > 1e-3 * scale, plain  # bfloat16 activations round visibly


def test_a_block_and_single_steps_round_alike_under_the_option(engines):
    """The verify pass (T tokens at once) against T one-token steps. (Plain bfloat16 is
    not checked: on XLA's CPU backend a tiny model's block and steps happen to agree bit for
    bit, as SmolLM2's did on 50 prompts: see docs/decoding.md#precision.)"""
    tokens = np.random.default_rng(1).integers(0, 512, (2, 10))
    P = 4
    model = engines["option"].model
    cache = init_cache(model.config, 2, 16)
    _, cache = step(model, jnp.asarray(tokens[:, :P]), cache)
    block, _ = step(model, jnp.asarray(tokens[:, P:]), cache)
    singles = []
    for t in range(P, tokens.shape[1]):
        out, cache = step(model, jnp.asarray(tokens[:, t:t + 1]), cache)
        singles.append(np.asarray(out[:, 0]))
    np.testing.assert_allclose(np.asarray(block), np.stack(singles, 1), atol=1e-5)


def test_greedy_orthrus_equals_ar_under_the_option(engines):
    gen = engines["option"]
    kwargs = dict(max_new_tokens=20, eos_ids=[-1], batch_size=4)
    ar = gen.generate(PROMPTS, mode="ar", **kwargs)
    for block in (BLOCK, 2):
        orthrus = gen.generate(PROMPTS, mode="orthrus", block_size=block, **kwargs)
        assert [r.token_ids for r in orthrus] == [r.token_ids for r in ar]
        assert all(len(r.token_ids) == 20 for r in orthrus)


def test_dtype_pairs():
    assert check_dtypes("bfloat16") == "bfloat16"
    assert check_dtypes("bfloat16", "float32") == "float32"
    assert check_dtypes("float16", "float32") == "float32"
    assert check_dtypes("float32", "float32") == "float32"
    for param, compute in (("float32", "bfloat16"), ("float32", "float16"),
                           ("bfloat16", "float16"), ("float16", "bfloat16")):
        with pytest.raises(ValueError, match="--compute-dtype"):
            check_dtypes(param, compute)
    with pytest.raises(ValueError, match="--compute-dtype 'float64'"):
        check_dtypes("float32", "float64")


def test_the_python_api_refuses_a_bad_pair_before_loading(tmp_path):
    with pytest.raises(ValueError, match="--compute-dtype bfloat16 with float32 weights"):
        Generator.load(tmp_path / "no-such-model", dtype="float32", compute_dtype="bfloat16")


def run(module, *args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = module.main(list(map(str, args)))
    return status, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("module", [generate, bench, serve])
def test_every_cli_names_the_flag_of_a_bad_pair(module, tmp_path):
    status, _, err = run(module, "--model", tmp_path / "missing", "--prompts-file",
                         tmp_path / "missing.jsonl", "--dtype", "bfloat16",
                         "--compute-dtype", "float16") if module is bench else \
        run(module, "--model", tmp_path / "missing", "--dtype", "bfloat16",
            "--compute-dtype", "float16")
    assert status == 2
    assert err.strip().count("\n") == 0 and err.startswith("error: --compute-dtype float16 "), err


def test_generate_reports_both_dtypes(model_dir):
    status, out, err = run(generate, "--model", model_dir, "--prompt-ids", "1,2,3",
                           "--max-new-tokens", 3, "--eos-id", -1, "--dtype", "bfloat16",
                           "--compute-dtype", "float32")
    assert status == 0, err
    memory = err.strip().splitlines()[-1]
    assert memory.startswith("[memory] weights ") and "(bfloat16), KV cache " in memory
    assert "(float32, the compute dtype)" in memory
    status, out, err = run(generate, "--model", model_dir, "--prompt-ids", "1,2,3",
                           "--max-new-tokens", 3, "--eos-id", -1, "--dtype", "bfloat16",
                           "--json")
    assert status == 0, err
    [report] = [json.loads(line) for line in err.splitlines() if "memory" in line]
    assert (report["dtype"], report["compute_dtype"]) == ("bfloat16", "bfloat16")


@pytest.mark.slow
def test_bench_reports_both_dtypes(model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in PROMPTS))
    status, out, err = run(bench, "--model", model_dir, "--prompts-file", prompts,
                           "--max-new-tokens", 8, "--eos-id", -1, "--dtype", "bfloat16",
                           "--compute-dtype", "float32", "--batch-size", 4, "--json")
    assert status == 0, err
    r = json.loads(out)
    assert (r["dtype"], r["compute_dtype"]) == ("bfloat16", "float32")
    assert r["outputs_differ"] == 0
    text = bench.format_report(r)
    assert "bfloat16 weights, float32 compute" in text
    assert "(bfloat16), KV cache (largest)" in text and "(float32);" in text
