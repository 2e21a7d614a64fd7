"""``python -m train.distill`` on a tiny random model: records equal the engine's answers,
exact resume after a kill, the three prompt formats, bad records and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.hf_reference import tiny_model_dir
from train import distill
from train.records import Corpus

BATCH, NEW = "4", "5"
GSM8K = [{"question": f"What is {i}+{i}?", "answer": f"{2 * i}\n#### {2 * i}"}
         for i in range(7)]
CHAT = [
    {"messages": [{"role": "user", "content": "Hello"}]},
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                  {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
    {"messages": [{"role": "system", "content": "Be"}, {"role": "user", "content": "42"}]},
]
SHAREGPT = [
    {"id": "x", "conversations": [{"from": "system", "value": "Be"},
                                  {"from": "human", "value": "the cat"},
                                  {"from": "gpt", "value": "no"},
                                  {"from": "human", "value": "apples?"}]},
    {"id": "y", "conversations": [{"from": "human", "value": "world"}]},
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("distill")
    tiny_model_dir(d / "model", seed=7)
    write_jsonl(d / "gsm8k.jsonl", GSM8K)
    write_jsonl(d / "chat.jsonl", CHAT)
    text = json.dumps(SHAREGPT + [{"id": "cut", "conversations": [
        {"from": "human", "value": "this record is cut off in the middle"}]}], indent=1)
    (d / "sharegpt.json").write_text(text[:-30])  # truncated inside the last record
    return d


@pytest.fixture(scope="module")
def engines():
    """One loaded (and compiled) engine per model folder and options, shared by all runs."""
    cache = {}
    real = distill.load_generator

    def load(model_dir, max_len, dtype):
        key = (str(model_dir), max_len, dtype)
        if key not in cache:
            cache[key] = real(model_dir, max_len, dtype)
        return cache[key]

    return load


@pytest.fixture()
def run(workdir, engines, monkeypatch, capsys):
    """``run(out, *args)`` -> (status, stderr) of ``python -m train.distill``."""
    monkeypatch.setattr(distill, "load_generator", engines)

    def run(out, *args, prompts=("gsm8k.jsonl",)):
        argv = ["--model", workdir / "model", "--out", out, "--batch-size", BATCH,
                "--max-new-tokens", NEW, "--no-progress", *args,
                "--prompts", *[p if isinstance(p, Path) else workdir / p for p in prompts]]
        capsys.readouterr()
        status = distill.main([str(a) for a in argv])
        return status, capsys.readouterr().err

    return run


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def engine_answers(gen, prompts: list[list[dict]], **kwargs) -> list:
    ids = [gen.encode(p, chat=True) for p in prompts]
    return gen.generate(ids, mode="ar", max_new_tokens=int(NEW), batch_size=int(BATCH),
                        **kwargs)


@pytest.mark.slow
def test_records_are_the_engines_answers_in_order(workdir, engines, run, tmp_path):
    out = tmp_path / "sub" / "out.jsonl"
    status, err = run(out)
    assert status == 0, err
    recs = read(out)
    assert [r["source_index"] for r in recs] == list(range(len(GSM8K)))
    gen = engines(str(workdir / "model"), None, None)
    prompts = [[{"role": "user", "content": g["question"]}] for g in GSM8K]
    for rec, prompt, res in zip(recs, prompts, engine_answers(gen, prompts), strict=True):
        assert rec["messages"] == [*prompt, {"role": "assistant", "content": res.text}]
        assert rec["finish_reason"] == res.finish_reason in ("eos", "length")
        assert rec["source"] == "gsm8k.jsonl" and rec["line"] == rec["source_index"] + 1
    summary = err.strip().splitlines()[-1]
    assert summary.startswith(f"[distill] {len(GSM8K)} records written, 0 skipped "
                              "(already done), 0 bad, ")
    assert "tokens/s" in summary and f"batch size {BATCH}" in summary
    corpus = Corpus(out)  # train.main reads the output
    assert len(corpus) == len(GSM8K)
    assert corpus[3].messages == tuple(recs[3]["messages"])
    # Orthrus decoding gives the same file.
    orthrus = tmp_path / "orthrus.jsonl"
    assert run(orthrus, "--mode", "orthrus")[0] == 0
    assert orthrus.read_bytes() == out.read_bytes()


@pytest.mark.parametrize("sampling", [(), ("--temperature", "1.5", "--top-k", "50",
                                           "--seed", "3")], ids=["greedy", "sampled"])
def test_resume_after_a_kill_matches_an_uninterrupted_run(run, tmp_path, sampling):
    full = tmp_path / "full.jsonl"
    assert run(full, *sampling)[0] == 0
    # Killed after 3 records (inside the first batch), in the middle of writing the 4th.
    out = tmp_path / "out.jsonl"
    assert run(out, *sampling, "--limit", "3")[0] == 0
    assert [r["source_index"] for r in read(out)] == [0, 1, 2]
    with out.open("a") as f:
        f.write(full.read_text().splitlines()[3][:25])
    status, err = run(out, *sampling)
    assert status == 0, err
    assert "removing an incomplete last line" in err
    assert "4 records written, 3 skipped (already done)" in err
    assert out.read_bytes() == full.read_bytes()
    # Nothing left to do: a re-run writes nothing.
    status, err = run(out, *sampling)
    assert "0 records written, 7 skipped" in err and out.read_bytes() == full.read_bytes()
    # A prompt set split in two ranges gives the same file.
    split = tmp_path / "split.jsonl"
    assert run(split, *sampling, "--end", "5")[0] == 0
    assert run(split, *sampling, "--start", "5")[0] == 0
    assert split.read_bytes() == full.read_bytes()


def test_a_damaged_last_line_is_removed_and_other_damage_is_an_error(tmp_path):
    out = tmp_path / "out.jsonl"
    good = json.dumps({"source_index": 4, "messages": []})
    out.write_text(good + "\n" + '{"source_index": 5, "mess\x00\x00\n')
    messages = []
    assert distill.load_done(out, messages.append) == {4}
    assert out.read_text() == good + "\n" and "incomplete last line" in messages[0]
    out.write_text("garbage\n" + good + "\n")
    with pytest.raises(ValueError, match=r"out.jsonl:1: not a distilled record"):
        distill.load_done(out)
    out.write_text(good + "\n" + good + "\n")
    with pytest.raises(ValueError, match="appears twice"):
        distill.load_done(out)


def test_gsm8k_chat_and_truncated_sharegpt_inputs(workdir, engines, run, tmp_path):
    out = tmp_path / "out.jsonl"
    files = ("gsm8k.jsonl", "chat.jsonl", "sharegpt.json")
    status, err = run(out, prompts=files)
    assert status == 0, err
    assert "truncated record" in err
    recs = read(out)
    n = len(GSM8K) + len(CHAT) + len(SHAREGPT)  # the cut-off ShareGPT record is no record
    assert [r["source_index"] for r in recs] == list(range(n))
    assert [r["source"] for r in recs] == [f for f, rows in zip(
        files, (GSM8K, CHAT, SHAREGPT), strict=True) for _ in rows]
    prompts = [[{"role": "user", "content": g["question"]}] for g in GSM8K] + [
        [{"role": "user", "content": "Hello"}],
        [{"role": "user", "content": "a"}],  # up to the first answer
        [{"role": "system", "content": "Be"}, {"role": "user", "content": "42"}],
        [{"role": "system", "content": "Be"}, {"role": "user", "content": "the cat"}],
        [{"role": "user", "content": "world"}],
    ]
    assert [r["messages"][:-1] for r in recs] == prompts
    assert [r["line"] for r in recs[-4:]] == [2, 3, 2, 23]
    gen = engines(str(workdir / "model"), None, None)
    want = [r.text for r in engine_answers(gen, prompts)]
    assert [r["messages"][-1]["content"] for r in recs] == want
    # Prompts sorted by length within windows of 2 batches: the same greedy answers.
    srt = tmp_path / "sorted.jsonl"
    assert run(srt, "--sort-window", "2", prompts=files)[0] == 0
    assert srt.read_bytes() == out.read_bytes()


def test_bad_records_are_counted_and_skipped(workdir, run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps(GSM8K[0]), "{not json", json.dumps({"answer": "4"}),
             json.dumps({"question": "  "}), json.dumps({"question": "x" * 300}),
             json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}),
             json.dumps({"messages": [{"role": "robot", "content": "hi"}]}),
             json.dumps(GSM8K[1])]
    bad.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe\n")
    out = tmp_path / "out.jsonl"
    status, err = run(out, prompts=(bad,))
    assert status == 0, err
    assert [r["source_index"] for r in read(out)] == [0, 7]
    for line, why in [(2, "invalid JSON"), (3, "no 'question'"), (4, "empty prompt"),
                      (5, "prompt too long"), (6, "empty prompt"), (7, "unknown role"),
                      (9, "not UTF-8")]:
        assert any(m.startswith(f"{bad}:{line}: bad record") and why in m
                   for m in err.splitlines()), (line, why, err)
    assert "2 records written, 0 skipped (already done), 7 bad" in err


@pytest.mark.parametrize("case, message", [
    ("missing prompts", "not found"),
    ("missing model", "model folder not found"),
    ("no params", "no parameter checkpoint"),
    ("text prompts", "not a prompt file"),
    ("damaged output", "not a distilled record"),
])
def test_bad_input_exits_2(workdir, tmp_path, capsys, case, message):
    out = tmp_path / "out.jsonl"
    model, prompts, extra = workdir / "model", workdir / "gsm8k.jsonl", []
    if case == "missing prompts":
        prompts = tmp_path / "nope.jsonl"
    elif case == "missing model":
        model = tmp_path / "nope"
    elif case == "no params":
        model = tmp_path / "empty"
        model.mkdir()
        (model / "config.json").write_text((workdir / "model" / "config.json").read_text())
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (model / f).write_text((workdir / "model" / f).read_text())
    elif case == "text prompts":
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("hello\n")
    elif case == "damaged output":
        out.write_text("garbage\n{}\n")
    status = distill.main(["--model", str(model), "--prompts", str(prompts), "--out", str(out),
                           "--no-progress", *extra])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and message in err, err
