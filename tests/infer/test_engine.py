"""The engine's weight forms: the per-layer copy it makes by default, or the caller's stacked
model shared as is (``unstack=False``, what ``train.main --eval-shares-weights`` uses)."""

from __future__ import annotations

import jax
import pytest

from infer.engine import Generator, decode_dtype
from orthrus_jax.model import is_unstacked
from tests.hf_reference import hf_model, to_orthrus


@pytest.mark.slow
def test_a_shared_stacked_model_decodes_the_same_tokens_without_a_copy():
    model = to_orthrus(hf_model("qwen3", seed=4), block_size=4)
    prompts = [[5, 6, 7], [9, 8, 7, 6, 5]]
    copied = Generator(model).generate(prompts, max_new_tokens=10, eos_ids=[-1])
    shared_engine = Generator(model, unstack=False)
    shared = shared_engine.generate(prompts, max_new_tokens=10, eos_ids=[-1])
    assert [r.token_ids for r in shared] == [r.token_ids for r in copied]
    assert shared_engine.model is model and not is_unstacked(model.layers.mlp.up_proj.get_value())
    held = {id(a) for a in jax.tree.leaves(model)}
    assert all(id(a) in held for a in jax.tree.leaves(shared_engine.model))


def test_16_bit_weights_decode_in_float32_on_cpu_only():
    assert decode_dtype("bfloat16", "cpu") == decode_dtype("float16", "cpu") == "float32"
    assert decode_dtype("float32", "cpu") == "float32"
    assert decode_dtype("bfloat16", "gpu") == "bfloat16"
    assert decode_dtype("bfloat16", "tpu") == "bfloat16"


def test_both_projection_forms_decode_the_same_tokens_as_ar():
    """The decoder's [out, in] weights (CPU's default) and the training form, with chains
    (4 and 8 rows a pass at batch 2: the weight-first product) and trees."""
    model = to_orthrus(hf_model("llama", seed=7), block_size=4)
    prompts = [[5, 6, 7], [9, 8, 7, 6, 5]]
    out_in = Generator(model, weights_out_in=True)
    in_out = Generator(model, weights_out_in=False)
    assert out_in.model.out_in and not in_out.model.out_in
    ar = in_out.generate(prompts, mode="ar", max_new_tokens=12, eos_ids=[-1])
    for gen in (out_in, in_out):
        for plan in ({"block_size": 4}, {"block_size": 4, "tree_budget": 3}):
            got = gen.generate(prompts, max_new_tokens=12, eos_ids=[-1], **plan)
            assert [r.token_ids for r in got] == [r.token_ids for r in ar], plan
