"""A model folder's ``generation_config.json``: its end-of-sequence ids stop decoding (with
``config.json``'s) in ``infer.generate``, the Python API and the server's slot engine; its
sampling defaults apply when no sampling flag is given; bad values are refused naming the
file and the key. On a tiny random model folder without a tokenizer (token ids only)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest

from infer import bench, engine
from infer import generate as cli
from infer.engine import Generator
from infer.generation_config import (
    GenerationConfig,
    Sampling,
    generation_config_from_dict,
    read_generation_config,
)
from infer.slots import SlotEngine, SlotParams
from orthrus_jax.checkpoint import save_model
from orthrus_jax.cli import InputError
from tests.hf_reference import hf_model, to_orthrus

PROMPT = "4,5,6"
N = 8
QWEN3 = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
         "pad_token_id": 151643, "temperature": 0.6, "top_k": 20, "top_p": 0.95,
         "transformers_version": "4.51.0"}
QWEN3_SAMPLING = ("--temperature", 0.6, "--top-k", 20, "--top-p", 0.95)
TINY_QWEN3 = {**QWEN3, "eos_token_id": 2}  # Qwen3's ids are past the tiny vocabulary


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("genconf")
    save_model(to_orthrus(hf_model("llama", False, seed=5), block_size=4), path)
    return path


@pytest.fixture
def folder(base, tmp_path):
    """A copy of the model folder, to give a generation_config.json."""
    return shutil.copytree(base, tmp_path / "m")


def write_generation_config(folder, d) -> None:
    (folder / "generation_config.json").write_text(json.dumps(d))


def run(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main([str(a) for a in args])
    return status, out.getvalue(), err.getvalue()


def summary(err: str, mode: str) -> str:
    """The summary line of ``mode`` on stderr."""
    [line] = [x for x in err.splitlines() if x.startswith(f"[{mode}] ") and "tokens/s" in x]
    return line


def answer(folder, *args) -> tuple[dict, str]:
    """The JSON row of the prompt, and the sampling in effect (from stderr)."""
    status, out, err = run("--model", folder, "--prompt-ids", PROMPT, "--max-new-tokens", N,
                           "--json", *args)
    assert status == 0, err
    [row] = [json.loads(line) for line in out.strip().splitlines()]
    [sampling] = [json.loads(x)["sampling"] for x in err.splitlines() if '"sampling"' in x]
    return row, sampling


@pytest.fixture(scope="module")
def greedy(base) -> list[int]:
    """The greedy answer without generation_config.json (config.json's EOS not reached)."""
    status, out, err = run("--model", base, "--prompt-ids", PROMPT, "--max-new-tokens", N,
                           "--json")
    assert status == 0, err
    row = json.loads(out)
    assert row["finish_reason"] == "length" and len(row["token_ids"]) == N
    return row["token_ids"]


def first_new(tokens: list[int], start: int) -> int:
    """The index of the first token from ``start`` on that did not come before."""
    return next(i for i in range(start, len(tokens)) if tokens[i] not in tokens[:i])


# ------------------------------------------------------------------------ reading the file
def test_qwen3_file_gives_its_eos_ids_and_sampling():
    g = generation_config_from_dict(QWEN3)
    assert g.eos_token_id == (151645, 151643)
    assert g.sampling == Sampling(0.6, 20, 0.95, "generation_config.json")
    assert g.sampling.describe() == \
        "temperature 0.6, top-k 20, top-p 0.95 (generation_config.json)"


@pytest.mark.parametrize("d, sampling", [
    ({}, Sampling()),  # transformers: greedy unless do_sample is true
    ({"temperature": 0.6, "top_k": 20}, Sampling()),
    ({"do_sample": False, "temperature": 0.6, "top_p": 0.9},
     Sampling(source="generation_config.json")),
    ({"do_sample": True}, Sampling(1.0, 50, 1.0, "generation_config.json")),  # HF's defaults
    ({"do_sample": True, "top_k": 0, "top_p": None}, Sampling(1.0, 0, 1.0,
                                                                "generation_config.json")),
])
def test_do_sample_decides_as_in_transformers(d, sampling):
    assert generation_config_from_dict(d).sampling == sampling


def test_eos_id_forms_and_unknown_keys():
    assert generation_config_from_dict({"eos_token_id": 7, "num_beams": 4, "foo": [1]}
                                       ).eos_token_id == (7,)
    assert generation_config_from_dict({"eos_token_id": None}).eos_token_id == ()


def test_no_file_is_the_default(tmp_path):
    assert read_generation_config(tmp_path) == GenerationConfig()


@pytest.mark.parametrize("text, message", [
    ('{"temperature": "hot", "do_sample": true}', "temperature='hot' must be a finite number"),
    ('{"temperature": "hot"}', "temperature='hot' must be a finite number"),  # checked anyway
    ('{"eos_token_id": -1}', "eos_token_id=-1 must be a token id"),
    ('{"eos_token_id": [2, "3"]}', "eos_token_id=[2, '3'] must be a token id"),
    ('{"eos_token_id": [2, 600]}', "eos_token_id=[2, 600]: [600] outside the vocabulary "
                                   "[0, 512)"),
    ('{"do_sample": "yes"}', "do_sample='yes' must be true or false"),
    ('{"do_sample": true, "temperature": 0}', "temperature=0 must be > 0"),
    ('{"top_k": 2.5}', "top_k=2.5 must be an integer >= 0"),
    ('{"do_sample": true, "top_k": 5000}', "top_k=5000 must be at most 1024"),
    ('{"top_p": 0}', "top_p=0 must be in (0, 1]"),
    ('{"top_p": 1.5}', "top_p=1.5 must be in (0, 1]"),
    ('{"temperature": NaN}', "temperature=nan must be a finite number"),
    ('[1, 2]', "expected a JSON object, got a list"),
    ('{"do_sample": true,', "not valid JSON"),
])
def test_bad_file_is_refused_naming_file_and_key(tmp_path, text, message):
    path = tmp_path / "generation_config.json"
    path.write_text(text)
    with pytest.raises(InputError) as e:
        read_generation_config(tmp_path, vocab_size=512)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value), e.value


def test_bytes_that_are_not_utf8_are_refused(tmp_path):
    path = tmp_path / "generation_config.json"
    path.write_bytes(b'{"top_k": "\xff"}')
    with pytest.raises(InputError, match="not UTF-8 text"):
        read_generation_config(tmp_path)


@pytest.mark.parametrize("text, message", [
    ('{"temperature": "hot"}', "temperature='hot'"),
    ('{"eos_token_id": -1}', "eos_token_id=-1"),
    ("not json", "not valid JSON"),
])
def test_cli_refuses_a_bad_file_with_exit_status_2(folder, text, message):
    path = folder / "generation_config.json"
    path.write_text(text)
    status, out, err = run("--model", folder, "--prompt-ids", PROMPT)
    assert status == 2 and out == ""
    assert err.startswith(f"error: {path}: ") and message in err, err


# ------------------------------------------------------------------------ end of sequence
def test_generation_config_eos_stops_decoding(folder, greedy):
    stop = first_new(greedy, 2)  # a token the greedy answer reaches late, first there
    write_generation_config(folder, {"eos_token_id": [greedy[stop]]})
    row, _ = answer(folder)
    assert row["token_ids"] == greedy[:stop + 1] and row["finish_reason"] == "eos"
    # --eos-id replaces the model's ids (a negative id: none)
    row, _ = answer(folder, "--eos-id", -1)
    assert row["token_ids"] == greedy and row["finish_reason"] == "length"
    # the Python API stops there too
    [r] = engine.generate(folder, [[int(t) for t in PROMPT.split(",")]], max_new_tokens=N)
    assert r.token_ids == greedy[:stop + 1] and r.finish_reason == "eos"


def test_config_json_eos_still_stops_beside_the_file(folder, greedy):
    late = first_new(greedy, 4)
    early = first_new(greedy, 1)
    assert early < late
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = greedy[late]
    (folder / "config.json").write_text(json.dumps(config))
    unused = next(t for t in range(512) if t not in greedy)
    write_generation_config(folder, {"eos_token_id": unused})
    assert Generator.load(folder).eos_ids == (greedy[late], unused)
    row, _ = answer(folder)  # config.json's id stops it
    assert row["token_ids"] == greedy[:late + 1] and row["finish_reason"] == "eos"
    write_generation_config(folder, {"eos_token_id": [unused, greedy[early]]})
    row, _ = answer(folder)  # the file's, earlier
    assert row["token_ids"] == greedy[:early + 1] and row["finish_reason"] == "eos"


def test_server_slots_stop_on_the_file_eos(folder, greedy):
    stop = first_new(greedy, 2)
    write_generation_config(folder, {"eos_token_id": greedy[stop]})
    slots = SlotEngine(Generator.load(folder, max_len=64), slots=1, mode="ar")
    update = slots.insert(0, [int(t) for t in PROMPT.split(",")], SlotParams(N))
    out, finish = list(update.new_ids), update.finish_reason
    while finish is None:
        [update] = slots.step(1)
        out += update.new_ids
        finish = update.finish_reason
    assert out == greedy[:stop + 1] and finish == "eos"


# ------------------------------------------------------------------------ sampling defaults
@pytest.mark.slow
def test_sampling_defaults_apply_without_flags(folder, greedy):
    write_generation_config(folder, TINY_QWEN3)
    sampled = {}
    for seed in (1, 2):
        row, sampling = answer(folder, "--seed", seed)
        assert sampling == {"temperature": 0.6, "top_k": 20, "top_p": 0.95,
                            "source": "generation_config.json"}
        flags, sampling = answer(folder, "--seed", seed, *QWEN3_SAMPLING)
        assert sampling["source"] == "flags"
        assert row["token_ids"] == flags["token_ids"]
        sampled[seed] = row["token_ids"]
    assert any(s != greedy for s in sampled.values())
    # one flag away from greedy, whatever the file says
    for flag in (("--temperature", 0), ("--greedy",)):
        row, sampling = answer(folder, "--seed", 1, *flag)
        assert row["token_ids"] == greedy and sampling["temperature"] == 0.0
    # the Python API too
    [r] = engine.generate(folder, [[int(t) for t in PROMPT.split(",")]], max_new_tokens=N,
                          seed=1)
    assert r.token_ids == sampled[1]


def test_summary_line_says_what_sampling_and_where_from(folder, greedy):
    args = ("--model", folder, "--prompt-ids", PROMPT, "--max-new-tokens", N, "--mode", "ar")
    status, _, err = run(*args)
    assert status == 0 and summary(err, "ar").endswith("; sampling: greedy (default)"), err
    write_generation_config(folder, TINY_QWEN3)
    status, _, err = run(*args)
    assert status == 0 and summary(err, "ar").endswith(
        "; sampling: temperature 0.6, top-k 20, top-p 0.95 (generation_config.json)"), err
    status, _, err = run(*args, "--temperature", 0)
    assert status == 0 and summary(err, "ar").endswith("; sampling: greedy (flags)"), err


def test_do_sample_false_is_greedy(folder, greedy):
    write_generation_config(folder, {**QWEN3, "do_sample": False, "eos_token_id": None})
    row, sampling = answer(folder, "--seed", 1)
    assert row["token_ids"] == greedy
    assert sampling == {"temperature": 0.0, "top_k": 0, "top_p": 1.0,
                        "source": "generation_config.json"}


@pytest.mark.slow
def test_bench_takes_the_sampling_defaults(folder, tmp_path):
    write_generation_config(folder, TINY_QWEN3)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt_ids": [4, 5, 6]}) + "\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert bench.main(["--model", str(folder), "--prompts-file", str(prompts),
                           "--max-new-tokens", "5", "--json"]) == 0
    r = json.loads(out.getvalue())
    assert not r["greedy"] and r["sampling_source"] == "generation_config.json"
    assert (r["temperature"], r["top_k"], r["top_p"]) == (0.6, 20, 0.95)
    assert "sampling T=0.6 top_k=20 top_p=0.95 (generation_config.json)" in \
        bench.format_report(r)


def test_greedy_and_temperature_flags_conflict(folder, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--model", str(folder), "--prompt-ids", PROMPT, "--greedy",
                  "--temperature", "0.5"])
    assert e.value.code == 2
    assert "argument --temperature: not allowed with argument --greedy" in \
        capsys.readouterr().err
