"""The decode loops over caches with attention windows (:mod:`orthrus_jax.cache`): the
same tokens as over the whole cache, as rows of different lengths cross several windows
during prefill and decoding, in both modes, with chains and trees, greedy and sampled."""

from __future__ import annotations

import pytest

import infer.decode
from infer.engine import Generator
from orthrus_jax.cache import attention_windows
from tests.infer.test_decode import _model, _prompts, _run


def _outputs(monkeypatch, windows, **kwargs):
    monkeypatch.setattr(infer.decode, "attention_windows", windows)
    gen = Generator(_model("agree"))
    prompts = _prompts(5, n=3)
    return [(r.token_ids, r.finish_reason) for r in _run(gen, prompts, batch_size=3, **kwargs)]


@pytest.mark.parametrize("kwargs", [
    dict(mode="ar"),
    dict(mode="orthrus", block_size=8),
    dict(mode="orthrus", block_size=8, tree_budget=6),
    dict(mode="orthrus", block_size=8, temperature=0.8, seed=3),
], ids=["ar", "chain", "tree", "sampled"])
def test_windowed_decoding_equals_whole_cache_decoding(monkeypatch, kwargs):
    # windows of 8, 16 and 32 positions: prompts of 1-16 tokens and 24 new ones cross them
    small = _outputs(monkeypatch, lambda n: attention_windows(n, smallest=8), **kwargs)
    whole = _outputs(monkeypatch, lambda n: (), **kwargs)
    assert small == whole
