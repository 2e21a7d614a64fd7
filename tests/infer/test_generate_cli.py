"""``python -m infer.generate`` and the ``generate(...)`` API on tiny saved models: one with
a chat tokenizer, one without."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from infer import engine
from infer import generate as cli
from orthrus_jax.checkpoint import load_model, save_model
from orthrus_jax.memory import format_bytes, tree_bytes
from tests.hf_reference import hf_model, tiny_chat_tokenizer, tiny_model_dir, to_orthrus

JSON_KEYS = {"prompt", "text", "token_ids", "iterations", "tokens_per_iteration",
             "tokens_per_second", "finish_reason"}


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("chat"), block_size=4, seed=4)


@pytest.fixture(scope="module")
def ids_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ids")
    save_model(to_orthrus(hf_model("llama", False, seed=5), block_size=4), path)
    return path


def run(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main([str(a) for a in args])
    return status, out.getvalue(), err.getvalue()


def run_json(*args) -> list[dict]:
    status, out, err = run(*args, "--json")
    assert status == 0, err
    return [json.loads(line) for line in out.strip().splitlines()]


@pytest.mark.slow
def test_json_rows_for_every_kind_of_prompt(chat_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello"}) + "\n\n"
                       + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
                       + json.dumps({"prompt_ids": [5, 6, 7]}) + "\n")
    rows = run_json("--model", chat_dir, "--prompt", "the cat", "--prompt-ids", "3,4,5",
                    "--prompts-file", prompts, "--max-new-tokens", 9, "--eos-id", -1,
                    "--chat", "off")
    assert [r["prompt"] for r in rows] == ["the cat", [3, 4, 5], "hello",
                                           [{"role": "user", "content": "hi"}], [5, 6, 7]]
    tok = tiny_chat_tokenizer()
    for r in rows:
        assert set(r) >= JSON_KEYS
        assert len(r["token_ids"]) == 9 and r["finish_reason"] == "length"
        assert r["text"] == tok.decode(r["token_ids"], skip_special_tokens=True)
        assert r["iterations"] >= 1 and r["tokens_per_second"] > 0
    # The same prompts one by one, and through the Python API, give the same tokens.
    [alone] = run_json("--model", chat_dir, "--prompt", "the cat", "--max-new-tokens", 9,
                       "--eos-id", -1, "--chat", "off")
    assert alone["token_ids"] == rows[0]["token_ids"]
    [api] = engine.generate(chat_dir, ["the cat"], max_new_tokens=9, eos_ids=[-1])
    assert api.token_ids == rows[0]["token_ids"] and api.prompt == "the cat"


@pytest.mark.slow
def test_chat_template_and_modes_agree(chat_dir):
    [plain] = run_json("--model", chat_dir, "--prompt", "hi", "--max-new-tokens", 6,
                       "--eos-id", -1, "--chat", "off")
    [auto] = run_json("--model", chat_dir, "--prompt", "hi", "--max-new-tokens", 6,
                      "--eos-id", -1)  # the tokenizer has a template: used by default
    [chat] = run_json("--model", chat_dir, "--prompt", "hi", "--chat", "--max-new-tokens", 6,
                      "--eos-id", -1)
    [msgs] = run_json("--model", chat_dir, "--prompt", "hi", "--chat", "--mode", "ar",
                      "--max-new-tokens", 6, "--eos-id", -1)
    assert chat["token_ids"] == msgs["token_ids"]  # greedy orthrus == greedy AR
    assert chat["token_ids"] != plain["token_ids"]  # the template changed the prompt
    assert auto["token_ids"] == chat["token_ids"]
    assert msgs["tokens_per_iteration"] == 1.0


def test_human_output_ends_with_one_summary_line(ids_dir):
    status, out, err = run("--model", ids_dir, "--prompt-ids", "1,2,3", "--prompt-ids",
                           "9,8", "--max-new-tokens", 5, "--eos-id", -1, "--mode", "ar")
    assert status == 0, err
    blocks = [b for b in out.strip().split("\n\n") if b]
    assert len(blocks) == 2 and all(len(b.split()) == 5 for b in blocks)  # ids, no tokenizer
    lines = err.strip().splitlines()
    assert lines[-2].startswith("[ar] 10 tokens, 8 iterations, 1.00 tokens/iteration")
    weights = format_bytes(tree_bytes(load_model(ids_dir)))
    assert lines[-1].startswith(f"[memory] weights {weights} (float32), KV cache "), lines
    assert "host peak RSS" in lines[-1]


def test_json_output_reports_memory_on_stderr(ids_dir):
    status, out, err = run("--model", ids_dir, "--prompt-ids", "1,2,3", "--max-new-tokens", 3,
                           "--mode", "ar", "--json", "--batch-size", 2)
    assert status == 0, err
    [memory] = [json.loads(line)["memory"] for line in err.splitlines() if "memory" in line]
    config = load_model(ids_dir).config
    assert memory["weight_bytes"] == tree_bytes(load_model(ids_dir))
    # one program: 2 rows of 256 positions (the least cache length)
    per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * \
        config.head_dim * 4
    assert memory["cache_bytes"] == 2 * 256 * per_position + 2 * 4  # and the rows' lengths
    assert memory["host_peak_rss_bytes"] > memory["weight_bytes"]


@pytest.mark.slow
def test_stream_prints_what_the_final_output_holds(chat_dir):
    status, out, err = run("--model", chat_dir, "--prompt", "a", "--prompt", "b", "--stream",
                           "--max-new-tokens", 7, "--eos-id", -1)
    assert status == 0, err
    rows = run_json("--model", chat_dir, "--prompt", "a", "--prompt", "b",
                    "--max-new-tokens", 7, "--eos-id", -1, "--batch-size", 1)
    assert out == "\n\n".join(r["text"] for r in rows) + "\n"


@pytest.mark.slow
def test_sampling_flags_are_deterministic_for_a_seed(ids_dir):
    args = ("--model", ids_dir, "--prompt-ids", "4,5,6", "--max-new-tokens", 8,
            "--eos-id", -1, "--temperature", 1.5, "--top-k", 50, "--top-p", 0.9)
    [a], [b] = run_json(*args, "--seed", 1), run_json(*args, "--seed", 1)
    others = [run_json(*args, "--seed", s)[0]["token_ids"] for s in (2, 3, 4)]
    assert a["token_ids"] == b["token_ids"]
    assert any(o != a["token_ids"] for o in others)


@pytest.mark.parametrize("args, message", [
    (("--prompt", "hi"), "no tokenizer"),
    (("--prompt-ids", "1,x"), "comma-separated integers"),
    (("--prompt-ids", "1,99999"), "outside the vocabulary"),
    (("--prompt-ids", ","), "empty prompt"),
    (("--prompt-ids", "1", "--temperature", "-1"), "temperature"),
    (("--prompt-ids", "1", "--top-p", "0"), "top_p"),
    (("--prompt-ids", "1", "--top-p", "1.5"), "top_p"),
    (("--prompt-ids", ",".join(["1"] * 40), "--max-len", "32"), "does not fit the context"),
    (("--prompts-file", "missing.jsonl"), "prompts file not found"),
    ((), "no prompts"),
])
def test_bad_input_is_a_clear_error(ids_dir, args, message):
    status, out, err = run("--model", ids_dir, *args)
    assert status == 2 and message in err, err
    assert out == ""


def test_malformed_prompts_file_names_the_line(ids_dir, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt_ids": [1]}\n{"oops": 1}\n')
    status, _, err = run("--model", ids_dir, "--prompts-file", path)
    assert status == 2 and f"{path}:2" in err
    path.write_text('{"prompt_ids": [1]}\nnot json\n')
    status, _, err = run("--model", ids_dir, "--prompts-file", path)
    assert status == 2 and f"{path}:2: not valid JSON" in err


def test_missing_model_folder(tmp_path):
    status, _, err = run("--model", tmp_path / "nope", "--prompt-ids", "1")
    assert status == 2 and "nope" in err


def test_chat_template_kwargs_reach_the_template(chat_dir, tmp_path, capsys):
    """``--chat-template-kwargs``: the variables the template reads change the prompt (here
    a ``prefix`` written before the messages), the same ids given directly decode alike."""
    import shutil

    folder = shutil.copytree(chat_dir, tmp_path / "m")
    (folder / "chat_template.jinja").write_text(
        "{% if prefix %}{{ prefix }} {% endif %}{% for m in messages %}{{ m['content'] }}"
        "{% endfor %}")
    [loud] = run_json("--model", folder, "--prompt", "the cat", "--chat", "--mode", "ar",
                      "--chat-template-kwargs", '{"prefix": "a dog and"}',
                      "--max-new-tokens", 4, "--eos-id", -1)
    ids = tiny_chat_tokenizer().encode("a dog and the cat", add_special_tokens=False)
    [direct] = run_json("--model", folder, "--prompt-ids", ",".join(map(str, ids)),
                        "--mode", "ar", "--max-new-tokens", 4, "--eos-id", -1)
    assert loud["token_ids"] == direct["token_ids"]
    for bad, message in (("[1]", "must be an object of template variables, got a list"),
                         ('{"tokenize": true}', "'tokenize' is an argument"),
                         ("{x", "is not JSON")):
        with pytest.raises(SystemExit) as e:
            cli.main(["--model", str(folder), "--prompt", "hi", "--chat-template-kwargs", bad])
        assert e.value.code == 2 and message in capsys.readouterr().err
