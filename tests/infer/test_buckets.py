"""Prompt lengths rounded to buckets (:func:`infer.buckets.prompt_bucket`)."""

from __future__ import annotations

from infer.buckets import prompt_bucket, prompt_buckets
from orthrus_jax.cache import MIN_PROMPT_BUCKET


def test_prompts_pad_to_two_lengths_per_octave():
    ladder = [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    assert prompt_buckets(513, 512) == ladder
    for n in range(1, 513):
        p = prompt_bucket(n, 512)
        assert p == min(b for b in ladder if b >= n)
        assert p >= max(n, MIN_PROMPT_BUCKET)
        if n > MIN_PROMPT_BUCKET:
            assert p - n < n / 2  # at most a third of the padded length is padding
    # past the chunk size: whole chunks
    assert [prompt_bucket(n, 512) for n in (513, 1024, 1025)] == [1024, 1024, 1536]
    assert prompt_bucket(100, 64) == 128 and prompt_bucket(40, 64) == 48
