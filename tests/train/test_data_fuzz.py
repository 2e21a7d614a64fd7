"""Fuzzing the training-data readers (``train.records``): damaged bytes and arbitrary JSON in
chat JSONL, GSM8K JSONL and ShareGPT JSON-array files. Whatever the damage, a file is read
(every indexed record then reads back as a well-formed record) or refused with a
``ValueError`` that names it; with ``skip_malformed`` the good records survive, in order."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzzing import apply_mutations, byte_mutations
from tests.hf_reference import tiny_chat_tokenizer
from tests.train.test_data import GSM8K, MESSAGES, SHAREGPT
from train.chat import ChatEncoder
from train.records import Corpus, Record, answer_turns

# CI runs a few examples per fuzz test; ORTHRUS_FUZZ_EXAMPLES=10000 runs many.
EXAMPLES = int(os.environ.get("ORTHRUS_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
ROLES = {"system", "user", "assistant"}

FILES = {
    "messages.jsonl": "".join(json.dumps(r) + "\n" for r in MESSAGES),
    "gsm8k.jsonl": "".join(json.dumps(r) + "\n" for r in GSM8K),
    "sharegpt.json": json.dumps(SHAREGPT + MESSAGES, indent=2, ensure_ascii=False),
}
# Bytes that mean something to the readers: JSON punctuation, newlines, invalid UTF-8.
SPECIALS = [b"\n", b"{", b"}", b"[", b"]", b'"', b",", b":", b"\\", b"\xff", b"\xc3", b"\x00",
            b'"role"', b'"from"', b'"value": 1', b"null", b"\r\n"]

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["messages", "conversations", "role", "content", "from", "value",
                         "question", "answer", "text", "x"]), inner, max_size=4),
    max_leaves=12)


def check_read(path: Path, skip_malformed: bool) -> Corpus | None:
    """Read ``path``: a corpus whose every record is well formed, or None after a
    ValueError naming the file; any other exception fails the test."""
    try:
        corpus = Corpus(path, skip_malformed=skip_malformed)
    except ValueError as e:
        assert path.name in str(e), e
        return None
    for i in range(len(corpus)):
        check_record(corpus[i])
    return corpus


def check_record(rec: Record) -> None:
    if rec.messages is None:
        assert isinstance(rec.text, str) and rec.text.strip()
        return
    assert rec.messages and rec.messages[-1]["role"] == "assistant"
    for m in rec.messages:
        assert m["role"] in ROLES and isinstance(m["content"], str)


@pytest.mark.parametrize("name", sorted(FILES))
@FUZZ
@given(data=st.data())
def test_damaged_bytes_are_read_or_refused_by_name(tmp_path, name, data):
    original = FILES[name].encode("utf-8")
    ops = data.draw(byte_mutations(len(original), min(len(original) - 1, 200), SPECIALS))
    path = tmp_path / name
    path.write_bytes(apply_mutations(original, ops))
    strict = check_read(path, skip_malformed=False)
    lenient = check_read(path, skip_malformed=True)
    if strict is not None:  # what reads strictly reads the same leniently
        assert lenient is not None and len(lenient) == len(strict)
        assert [lenient[i] for i in range(len(lenient))] == \
            [strict[i] for i in range(len(strict))]


@FUZZ
@given(junk=st.lists(st.tuples(st.integers(0, len(MESSAGES) + len(GSM8K)), JSON),
                     min_size=1, max_size=4))
def test_arbitrary_json_lines_are_skipped_and_the_good_records_survive(tmp_path, junk):
    good = MESSAGES + GSM8K
    lines = [json.dumps(r) for r in good]
    for at, value in sorted(junk, key=lambda j: -j[0]):
        lines.insert(at, json.dumps(value))
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    check_read(path, skip_malformed=False)
    corpus = check_read(path, skip_malformed=True)
    assert corpus is not None
    survivors = [corpus[i] for i in range(len(corpus))]
    reference = Corpus(write(tmp_path / "good.jsonl", good))
    expected = [reference[i] for i in range(len(reference))]
    # every good record survives, in order (junk that happens to be valid may add records)
    contents = [tuple(m["content"] for m in r.messages) for r in survivors if r.messages]
    it = iter(contents)
    for r in expected:
        assert tuple(m["content"] for m in r.messages) in it


def write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# Contents that interact with a ChatML rendering: its special tokens, partial tags,
# newlines, and byte-level pieces that merge across a turn's boundary.
PIECES = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "assistant\n", "user", "<|im",
          "_end|>", "\n", " ", "the cat", "é", "🐈", "\r", "\t", "<", "|>", ""]


@FUZZ
@given(turns=st.lists(st.tuples(st.sampled_from(["user", "assistant", "system"]),
                                st.lists(st.sampled_from(PIECES), max_size=5).map("".join)),
                      min_size=1, max_size=5))
def test_any_message_content_encodes_or_is_refused_by_record(tokenizer, turns):
    """Assistant masks stay aligned with the tokens whatever the contents hold; a record
    the template cannot encode is refused naming it."""
    messages = tuple({"role": r, "content": c} for r, c in turns)
    rec = Record("fuzz.jsonl", 7, messages=messages)
    encoder = ChatEncoder(tokenizer)
    try:
        [example] = encoder.encode_many([rec], return_errors=True)
    except ValueError as e:
        assert "fuzz.jsonl:7: " in str(e), e
        return
    if isinstance(example, ValueError):
        assert "fuzz.jsonl:7: " in str(example)
        return
    assert len(example.tokens) == len(example.assistant_mask) > 0
    assert example.assistant_mask.any() == bool(answer_turns(list(messages)))


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_chat_tokenizer()
