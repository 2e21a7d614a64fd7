"""``python -m infer.bench`` on a tiny saved model (no tokenizer: prompts as token ids)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from infer import bench
from orthrus_jax.checkpoint import save_model
from tests.hf_reference import hf_model, to_orthrus

BLOCK = 4
PROMPTS = [[5, 9, 17, 3, 80], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17],
           [200, 201], [42, 42, 42, 7, 300, 12, 9]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    save_model(to_orthrus(hf_model("qwen3", False, seed=3), block_size=BLOCK), path)
    return path


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in PROMPTS) + "\n")
    return path


def run_json(*args) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert bench.main([*map(str, args), "--json"]) == 0
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def greedy_report(model_dir, prompts_file):
    return run_json("--model", model_dir, "--prompts-file", prompts_file, "--max-new-tokens",
                    12, "--repeats", 2, "--batch-size", 2, "--eos-id", -5)  # -5: no EOS


@pytest.mark.slow
def test_bench_json_greedy(greedy_report):
    r = greedy_report
    assert r["num_prompts"] == len(PROMPTS) and r["block_size"] == BLOCK
    assert r["greedy"] and r["repeats"] == 2 and r["dtype"] == "float32"
    assert r["outputs_differ"] == 0 and r["divergence"] == [] and r["deterministic"]
    o, a = r["modes"]["orthrus"], r["modes"]["ar"]
    for m in (o, a):
        assert m["tokens"] == 12 * len(PROMPTS)  # no EOS: every prompt uses its budget
        assert m["tokens_per_second"] > 0 and m["time_to_first_token"] > 0
        assert m["compile_seconds"] > 0 and len(m["round_seconds"]) == 2
        assert m["seconds"] == pytest.approx(min(m["round_seconds"]), abs=1e-3)
    assert a["tokens_per_iteration"] == 1.0 and a["iterations"] == 11 * len(PROMPTS)
    assert "accepted_hist" not in a
    hist = o["accepted_hist"]
    assert len(hist) == BLOCK and sum(hist) == o["iterations"]
    # hist[j] counts iterations that accepted j drafts: j + 1 tokens before the budget cut,
    # which only each prompt's last iteration can have (by at most K - 1 tokens)
    uncut = sum((i + 1) * h for i, h in enumerate(hist))
    assert 11 * len(PROMPTS) <= uncut <= 11 * len(PROMPTS) + (BLOCK - 1) * len(PROMPTS)
    assert o["mean_accepted_length"] == pytest.approx((uncut - sum(hist)) / sum(hist))
    assert o["tokens_per_iteration"] == pytest.approx(11 * len(PROMPTS) / o["iterations"])
    assert 1.0 <= o["tokens_per_iteration"] <= BLOCK
    assert sum(o["accepted_share"]) == pytest.approx(1.0)
    assert r["speedup"] == pytest.approx(o["tokens_per_second"] / a["tokens_per_second"])
    assert [p["prompt_tokens"] for p in r["prompts"]] == [len(p) for p in PROMPTS]
    assert all(p["first_divergence"] is None for p in r["prompts"])
    memory = r["memory"]
    assert memory["weight_bytes"] > 0 and memory["cache_bytes"] > 0
    assert memory["host_peak_rss_bytes"] > memory["weight_bytes"] + memory["cache_bytes"]


@pytest.mark.slow
def test_bench_text_report(greedy_report):
    out = bench.format_report(greedy_report)
    for text in ("tokens / iteration", "tokens / s", "time to first token", "compile seconds",
                 "speedup", "orthrus acceptance", "greedy outputs differing: 0 of 4",
                 f"orthrus verify pass: {BLOCK} rows (chains)",
                 "memory: weights "):
        assert text in out, out


def test_first_divergence():
    assert bench.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert bench.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert bench.first_divergence([1, 2], [1, 2, 3]) == 2


@pytest.mark.slow
def test_bench_trees(model_dir, prompts_file):
    """``--tree-budget N``: the same outputs as AR, and the verify rows reported."""
    r = run_json("--model", model_dir, "--prompts-file", prompts_file, "--max-new-tokens",
                 12, "--batch-size", 2, "--eos-id", -5, "--tree-budget", 6)
    assert r["tree_budget"] == 6 and r["outputs_differ"] == 0
    o = r["modes"]["orthrus"]
    assert o["verify_rows"] == [7] and r["modes"]["ar"]["verify_rows"] == [1]
    assert sum(o["accepted_hist"]) == o["iterations"] and len(o["accepted_hist"]) == BLOCK
    assert "orthrus verify pass: 7 rows (tree budget 6)" in bench.format_report(r)


@pytest.mark.slow
def test_bench_sampling_and_limit(model_dir, prompts_file):
    r = run_json("--model", model_dir, "--prompts-file", prompts_file, "--limit", 1,
                 "--max-new-tokens", 5, "--temperature", 0.8, "--top-k", 20)
    assert not r["greedy"] and r["outputs_differ"] is None and r["num_prompts"] == 1
    assert r["modes"]["orthrus"]["tokens"] == 5


@pytest.mark.parametrize("lines,message", [
    (None, "not found"),
    (['{"prompt_ids": [1, 2]}', "{not json"], ":2: not valid JSON"),
    (['{"text": "hi"}'], "expected exactly one of"),
    (['{"prompt": "hello"}'], "no tokenizer"),
    (['{"prompt_ids": [1, 99999]}'], "outside the vocabulary"),
    ([""], "no prompts"),
])
def test_bench_errors(model_dir, tmp_path, capsys, lines, message):
    path = tmp_path / "p.jsonl"
    if lines is not None:
        path.write_text("\n".join(lines) + "\n")
    assert bench.main(["--model", str(model_dir), "--prompts-file", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_bench_missing_model(tmp_path, prompts_file, capsys):
    assert bench.main(["--model", str(tmp_path / "nope"), "--prompts-file",
                       str(prompts_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


def test_long_context_bench_table_and_chart(model_dir, prompts_file, tmp_path):
    """``--context``: every prompt is preceded by filler to exactly that many tokens, both
    modes run at each context (greedy outputs equal), and the chart is written."""
    chart = tmp_path / "context.png"
    r = run_json("--model", model_dir, "--prompts-file", prompts_file, "--limit", 2,
                 "--max-new-tokens", 6, "--context", "24,40", "--chart", chart,
                 "--eos-id", -5)
    assert [c["context"] for c in r["contexts"]] == [24, 40]
    # the report's prompts are the last context's: each exactly that long
    assert [p["prompt_tokens"] for p in r["prompts"]] == [40, 40]
    for c in r["contexts"]:
        assert c["outputs_differ"] == 0
        assert c["orthrus_tokens_per_second"] > 0 and c["ar_decode_tokens_per_second"] > 0
        assert c["speedup"] == pytest.approx(
            c["orthrus_tokens_per_second"] / c["ar_tokens_per_second"])
        assert c["ar_tokens_per_iteration"] == 1 and c["orthrus_tokens_per_iteration"] >= 1
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert bench.with_context([7, 8], [1, 2, 3, 4], 5) == [1, 2, 3, 7, 8]
    assert bench.with_context([7, 8, 9], [1, 2], 2) == [7, 8, 9]


@pytest.mark.parametrize("args, message", [
    (["--context", "40,24"], "contexts must increase"),
    (["--context", "250"], "--context 250: with --max-new-tokens 8 the model's cache of 256"),
    (["--chart", "x.png"], "--chart needs --context"),
])
def test_long_context_flags_are_checked(model_dir, prompts_file, capsys, args, message):
    try:  # argparse exits, the command returns its status
        status = bench.main(["--model", str(model_dir), "--prompts-file", str(prompts_file),
                             "--max-new-tokens", "8", *args])
    except SystemExit as e:
        status = e.code
    assert status == 2 and message in capsys.readouterr().err
