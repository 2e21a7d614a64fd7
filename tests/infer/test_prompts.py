"""Prompt files and prompt records: every malformed record is refused before any work with
one ``error:`` line naming the file, line and field (exit status 2), and a fuzzed file
never gives anything else."""

from __future__ import annotations

import contextlib
import io
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infer import generate as cli
from infer.prompts import check_messages, check_prompt_item, read_prompts_file
from orthrus_jax.cli import InputError

# CI runs a few examples per fuzz test; ORTHRUS_FUZZ_EXAMPLES=10000 runs many.
EXAMPLES = int(os.environ.get("ORTHRUS_FUZZ_EXAMPLES", "150"))

USER = {"role": "user", "content": "hi"}
BAD_RECORDS = [  # (record, what the message must say)
    ({"prompt": 5}, "'prompt' must be a string, got a number"),
    ({"messages": [{"role": "user", "content": 7}]}, "'messages'[0]: 'content' must be a string"),
    ({"messages": "hello"}, "'messages' must be a non-empty list"),
    ({"prompt": ""}, "'prompt' is empty"),
    ({"prompt": "   \n"}, "'prompt' is empty"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [USER, "x"]}, "'messages'[1] must be an object"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "'messages'[0]: 'role' must be one of"),
    ({"messages": [{"content": "x"}]}, "'role' must be one of"),
    ({"messages": [{"role": "system", "content": "x"}]}, "'messages' has no 'user' message"),
    ({"messages": [{"role": "user"}]}, "'content' must be a string, got null"),
    ({"prompt_ids": []}, "'prompt_ids' must be a non-empty list"),
    ({"prompt_ids": "1,2"}, "'prompt_ids' must be a non-empty list of token ids, got a string"),
    ({"prompt_ids": [1, "2"]}, "'prompt_ids'[1] must be a token id"),
    ({"prompt_ids": [1, -3]}, "'prompt_ids'[1] must be a token id (an integer >= 0), got -3"),
    ({"prompt_ids": [1.5]}, "'prompt_ids'[0] must be a token id"),
    ({"prompt_ids": [True]}, "'prompt_ids'[0] must be a token id"),
    ({"prompt": "a", "prompt_ids": [1]}, "expected exactly one of"),
    ({"question": "what?"},
     "expected exactly one of ['prompt', 'messages', 'prompt_ids'], got none"),
    ([1, 2], "expected a JSON object"),
    ("text", "expected a JSON object with one of"),
    (None, "got null"),
]


@pytest.mark.parametrize("record,message", BAD_RECORDS,
                         ids=[str(i) for i in range(len(BAD_RECORDS))])
def test_bad_record_names_file_line_and_field(tmp_path, record, message):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(InputError) as e:
        read_prompts_file(path)
    assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value), str(e.value)


@pytest.mark.parametrize("content,message", [
    (b"not json\n", ":1: not valid JSON"),
    (b'{"prompt": "a"', ":1: not valid JSON"),
    (b"\xff\xfe\x00bad", "not UTF-8 text"),
    (b"\n  \n", "no prompts"),
    (b"[" * 5000 + b"]" * 5000 + b"\n", ":1: "),  # deep nesting: refused, not a crash
])
def test_unreadable_files(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError) as e:
        read_prompts_file(path)
    assert message in str(e.value)


def test_good_records_come_back_as_they_are(tmp_path):
    rows = [{"prompt": "a b"}, {"messages": [{"role": "system", "content": ""}, USER]},
            {"prompt_ids": [0, 5]}, {"prompt": "x", "answer": "extra keys are ignored"}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_prompts_file(path) == rows
    assert [check_prompt_item(r) for r in rows] == rows


def test_messages_given_to_the_engine_are_checked_too():
    with pytest.raises(InputError, match=r"messages\[0\]: 'content' must be a string"):
        check_messages([{"role": "user", "content": ["a"]}])


# ------------------------------------------------------------------ the CLI
def run(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main([str(a) for a in args])
    return status, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("record", [{"prompt": 5}, {"messages": [{"role": "user", "content": 7}]},
                                    {"messages": "hello"}])
def test_the_cli_refuses_before_loading_anything(tmp_path, record):
    """The three cases that used to end in a traceback or in silence; the model folder does
    not even exist: the prompts are checked first."""
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(record) + "\n")
    status, out, err = run("--model", tmp_path / "no-model", "--prompts-file", path)
    assert status == 2 and out == ""
    assert err.startswith(f"error: {path}:1: ") and err.count("\n") == 1, err


# ------------------------------------------------------------------ fuzzing
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["prompt", "messages", "prompt_ids", "role", "content", "x"]), inner,
        max_size=4),
    max_leaves=12)


@settings(max_examples=EXAMPLES, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(record=JSON)
def test_fuzzed_records_are_accepted_or_refused_cleanly(record):
    try:
        assert check_prompt_item(record) is record
    except InputError as e:
        assert str(e).startswith("prompt: ")


VALID = (json.dumps({"prompt": "hello there"}) + "\n"
         + json.dumps({"messages": [{"role": "system", "content": "be brief"}, USER]}) + "\n"
         + json.dumps({"prompt_ids": [1, 2, 3]}) + "\n").encode()


@settings(max_examples=EXAMPLES, deadline=2000,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, len(VALID)),
       flips=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=4))
def test_fuzzed_files_are_read_or_refused_cleanly(tmp_path, cut, flips):
    data = bytearray(VALID[:cut])
    for i, b in flips:
        if i < len(data):
            data[i] = b
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(bytes(data))
    try:
        rows = read_prompts_file(path)
    except InputError as e:
        assert str(e).startswith(f"{path}"), str(e)
    else:
        assert rows and all(check_prompt_item(r) is r for r in rows)
