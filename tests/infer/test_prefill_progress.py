"""A long prompt reports its prefill chunk by chunk (``Generator.prefill_progress``, the
command lines' ``--prefill-progress``); the answer is the same with or without it, and a
short prompt reports nothing."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np

from infer import generate as cli
from infer.engine import PROGRESS_CHUNKS, Generator
from infer.options import prefill_progress
from tests.hf_reference import hf_model, tiny_model_dir, to_orthrus


def test_each_chunk_of_a_long_prompt_is_reported_and_the_answer_unchanged():
    gen = Generator(to_orthrus(hf_model("qwen3", False, seed=0), block_size=4), max_len=128,
                    chunk_size=16)
    rng = np.random.default_rng(0)
    long, short = rng.integers(0, 512, 70).tolist(), rng.integers(0, 512, 30).tolist()
    plain = [r.token_ids for r in gen.generate([long, short], max_new_tokens=6, batch_size=1)]
    seen = []
    gen.prefill_progress = lambda done, total: seen.append((done, total))
    got = [r.token_ids for r in gen.generate([long, short], max_new_tokens=6, batch_size=1)]
    assert got == plain
    # 70 tokens: 5 chunks of 16, reported; 30 tokens: 2 chunks, below PROGRESS_CHUNKS
    assert PROGRESS_CHUNKS == 4
    assert seen == [(16, 70), (32, 70), (48, 70), (64, 70), (70, 70)]


def test_the_line_is_on_when_asked_or_when_stderr_is_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True
    for flag, stream, shown in [(None, io.StringIO(), False), (None, Tty(), True),
                                (True, io.StringIO(), True), (False, Tty(), False)]:
        show = prefill_progress(argparse.Namespace(prefill_progress=flag), stream)
        assert (show is not None) == shown
        if show:
            show(512, 2000)
            show(2000, 2000)
            assert stream.getvalue() == ("\rprefill: 512 / 2,000 prompt tokens"
                                         "\rprefill: 2,000 / 2,000 prompt tokens\n")


def test_the_command_line_prints_it(tmp_path, capsys):
    folder = tiny_model_dir(tmp_path / "m", block_size=4)
    prompts = tmp_path / "p.jsonl"
    ids = np.random.default_rng(1).integers(0, 300, 4 * 512).tolist()  # 4 chunks of 512
    prompts.write_text(json.dumps({"prompt_ids": ids}) + "\n")
    assert cli.main(["--model", str(folder), "--prompts-file", str(prompts), "--max-len",
                     "2100", "--max-new-tokens", "2", "--eos-id", "-1",
                     "--prefill-progress"]) == 0
    err = capsys.readouterr().err
    assert "\rprefill: 512 / 2,048 prompt tokens" in err
    assert "\rprefill: 2,048 / 2,048 prompt tokens\n" in err
