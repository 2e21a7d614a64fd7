"""The OpenAI-compatible server (``infer.serve``) on a tiny random model, over real HTTP on
127.0.0.1 (uvicorn in a thread), called with the official ``openai`` client and ``httpx``.

Every answer is compared with ``Generator.generate`` of the same prompt and settings on a
second engine over the same folder (offline, in this process).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import uvicorn

from infer.engine import Generator
from infer.loadtest import run_load, summarize
from infer.serve import build_server
from orthrus_jax.cli import InputError
from tests.hf_reference import tiny_model_dir

MAX_LEN = 64
SLOTS = 4
NAME = "tiny"
WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "two", "dogs", "ran", "far",
         "away", "from", "home", "and", "back", "again"]


def _free_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("serve") / "m", block_size=4)


@pytest.fixture(scope="module")
def offline(folder) -> Generator:
    return Generator.load(folder, max_len=MAX_LEN)


@pytest.fixture(scope="module")
def server(folder):
    # queued requests are prefilled two at a time (the concurrency tests go through both);
    # prompts reuse cached prefixes in blocks of 8 tokens, and a prompt with more than 16
    # uncached tokens is prefilled 16 at a time between decode steps
    srv = build_server(Generator.load(folder, max_len=MAX_LEN), slots=SLOTS, model_name=NAME,
                       queue_size=64, deadline=60.0, max_body=4096, prefill_rows=2,
                       prefix_cache_mb=1.0, prefix_block_tokens=8, prefill_chunk_tokens=16)
    sock = _free_socket()
    uv = uvicorn.Server(uvicorn.Config(srv.app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.01)
    srv.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield srv
    uv.should_exit = True
    thread.join(10)
    srv.close()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _text(rng, lo=1, hi=5) -> str:
    """A few words: prompts stay in the 16 (completions) and 32 (chat) token buckets, so
    the offline engine compiles few programs."""
    return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))


def _ref(offline: Generator, prompt, *, chat: bool, max_tokens: int, temperature=0.0,
         top_k=0, top_p=1.0, seed=0):
    """Offline text, finish reason (OpenAI's) and token count."""
    ids = offline.encode(prompt, chat=chat)
    [r] = offline.generate([ids], max_new_tokens=max_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p, seed=seed, block_size=4)
    reason = {"eos": "stop", "length": "length", "cache_full": "length"}[r.finish_reason]
    return r.text, reason, len(r.token_ids), len(ids)


def _complete(client, prompt, chat: bool, **kw):
    """(text, finish_reason, usage) from the openai client."""
    if chat:
        r = client.chat.completions.create(model=NAME, messages=[{"role": "user",
                                                                  "content": prompt}], **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    r = client.completions.create(model=NAME, prompt=prompt, **kw)
    return r.choices[0].text, r.choices[0].finish_reason, r.usage


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_greedy_and_seeded_answers_equal_offline(client, offline, chat):
    rng = np.random.default_rng(1)
    for sampling in (dict(temperature=0.0), dict(temperature=0.9, top_p=0.9, seed=7),
                     dict(temperature=1.2, top_k=20, seed=123)):
        prompt = _text(rng)
        text, reason, usage = _complete(client, prompt, chat, max_tokens=12,
                                        extra_body={"top_k": sampling.get("top_k", 0)},
                                        **{k: v for k, v in sampling.items() if k != "top_k"})
        ref_text, ref_reason, n, n_prompt = _ref(offline, prompt, chat=chat, max_tokens=12,
                                                 **sampling)
        assert (text, reason) == (ref_text, ref_reason), sampling
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == \
            (n_prompt, n, n_prompt + n)


def test_stream_sends_each_iteration_and_equals_the_answer(client, offline):
    prompt = "two dogs"
    ref_text, ref_reason, n, _ = _ref(offline, prompt, chat=True, max_tokens=12)
    chunks = list(client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": prompt}], max_tokens=12,
        temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and
              c.choices[0].delta.content]
    assert "".join(deltas) == ref_text and len(deltas) > 1
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == ref_reason and set(finals[:-1]) == {None}
    assert chunks[-1].usage.completion_tokens == n
    # raw SSE: "data: {...}" events ending with "data: [DONE]"
    with httpx.stream("POST", f"{client.base_url}completions", json=dict(
            model=NAME, prompt=prompt, max_tokens=10, temperature=0, stream=True)) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_stop_strings_across_token_boundaries(client, offline):
    prompt = "the cat sat"
    [r] = offline.generate([offline.encode(prompt)], max_new_tokens=12, block_size=4)
    full = r.text
    # a two-character stop string across the boundary of two tokens, first seen there
    ends = [len(p) for p in (offline.decode_text(r.token_ids[:i])
                             for i in range(2, len(r.token_ids)))
            if len(p) > 1 and full.startswith(p) and len(full) > len(p)]
    at = next(e - 1 for e in ends if "\ufffd" not in full[e - 1:e + 1]
              and full.find(full[e - 1:e + 1]) == e - 1)
    stop, want = full[at:at + 2], full[:at]
    text, reason, _ = _complete(client, prompt, False, max_tokens=12, temperature=0,
                                stop=[stop, "\x00never"])
    assert (text, reason) == (want, "stop")
    streamed = [c.choices[0].text for c in client.completions.create(
        model=NAME, prompt=prompt, max_tokens=12, temperature=0, stop=stop, stream=True)]
    assert "".join(streamed) == want and all(stop not in s for s in streamed)


def test_a_chats_second_turn_reuses_the_first_and_answers_as_offline(server, client, offline):
    def counted():
        text = httpx.get(server.url + "/metrics").text
        return {name: float(line.split()[-1]) for line in text.splitlines()
                for name in ("orthrus_prefix_cache_hits_total",
                             "orthrus_prefix_cache_queries_total") if line.startswith(name)}
    system = {"role": "system", "content": "a cat"}
    first = [system, {"role": "user", "content": "two dogs"}]
    before, chunks = counted(), server.scheduler.engine.chunks
    r = client.chat.completions.create(model=NAME, messages=first, max_tokens=6, temperature=0)
    answer = r.choices[0].message.content
    second = first + [{"role": "assistant", "content": answer},
                      {"role": "user", "content": "ran"}]
    r2 = client.chat.completions.create(model=NAME, messages=second, max_tokens=4,
                                        temperature=0)
    for messages, got, n in ((first, answer, 6), (second, r2.choices[0].message.content, 4)):
        [ref] = offline.generate([offline.encode(messages, chat=True)], max_new_tokens=n,
                                 block_size=4)
        assert got == ref.text
    after = counted()
    n2 = len(offline.encode(second, chat=True))
    hits = after["orthrus_prefix_cache_hits_total"] - before["orthrus_prefix_cache_hits_total"]
    # the second turn found the first turn's whole blocks
    assert hits >= len(offline.encode(first, chat=True)) // 8 * 8 > 0
    assert hits <= n2 - 1
    # the first turn (34 tokens) was prefilled 16 tokens at a time, its rest at insert
    assert server.scheduler.engine.chunks > chunks
    health = _health(server)["prefix_cache"]
    assert health["block_tokens"] == 8 and 0 < health["blocks"] <= health["capacity"]


# --------------------------------------------------------------------------- batching


@pytest.mark.slow
def test_32_concurrent_requests_equal_offline_without_compiling(client, offline,
                                                                backend_compiles):
    rng = np.random.default_rng(2)
    jobs = []
    for i in range(32):
        sampling = dict(temperature=0.0) if i % 2 else dict(temperature=0.8, seed=i)
        jobs.append((_text(rng), i % 3 == 0, int(rng.integers(1, 13)), sampling))
    refs = [_ref(offline, p, chat=c, max_tokens=m, **s) for p, c, m, s in jobs]
    n0 = backend_compiles()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        got = list(pool.map(lambda j: _complete(client, j[0], j[1], max_tokens=j[2], **j[3]),
                            jobs))
    assert backend_compiles() == n0
    for (text, reason, usage), (ref_text, ref_reason, n, _) in zip(got, refs, strict=True):
        assert (text, reason, usage.completion_tokens) == (ref_text, ref_reason, n)


def test_health_counts_the_programs_still_to_run_once_while_idle(server):
    t0 = time.monotonic()
    while _health(server)["warm_runs_left"] and time.monotonic() < t0 + 60:
        time.sleep(0.05)
    assert _health(server)["warm_runs_left"] == 0
    assert server.scheduler.engine.warm_runs() == []


def _health(server) -> dict:
    return httpx.get(server.url + "/health").json()


def test_disconnect_mid_stream_frees_the_slot(server):
    """A slowed-down engine (20 ms per iteration): the request is surely still decoding when
    the client goes away, and its slot is freed within a few iterations."""
    engine = server.scheduler.engine
    step = engine.step
    engine.step = lambda n=1: (time.sleep(0.02), step(n))[1]
    try:
        before = server.metrics.requests.labels("cancelled")._value.get()
        body = dict(model=NAME, prompt="a mat", max_tokens=60, temperature=1.0, seed=3,
                    stream=True)
        with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            t0 = time.monotonic()
            while _health(server)["busy"] == 0 and time.monotonic() < t0 + 10:
                time.sleep(0.01)
            time.sleep(0.1)
            assert _health(server)["busy"] == 1  # decoding, 60 iterations take 1.2 s
        t0 = time.monotonic()
        while _health(server)["busy"] and time.monotonic() < t0 + 10:
            time.sleep(0.01)
        assert time.monotonic() - t0 < 1.0 and _health(server)["busy"] == 0
        assert server.metrics.requests.labels("cancelled")._value.get() == before + 1
    finally:
        del engine.step


def test_disconnect_while_a_long_prompt_prefills_in_chunks(server):
    """Chunks slowed to 0.3 s: the client leaves during the chunked prefill of its 50-token
    prompt (three chunks of 16 before the insert); the request is dropped before it is
    inserted and its kept slot is free again."""
    engine = server.scheduler.engine
    chunk = engine.prefill_next_chunk
    engine.prefill_next_chunk = lambda ids: (time.sleep(0.3), chunk(ids))[1]
    try:
        before = server.metrics.requests.labels("cancelled")._value.get()
        inserted, chunks = sum(engine.inserted.values()), engine.chunks
        ids = np.random.default_rng(9).integers(3, 300, 50).tolist()
        body = dict(model=NAME, prompt=ids, max_tokens=4, temperature=0, stream=True)
        with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            t0 = time.monotonic()
            while _health(server)["busy"] == 0 and time.monotonic() < t0 + 10:
                time.sleep(0.01)
            assert _health(server)["busy"] == 1  # its slot is kept while it prefills
        t0 = time.monotonic()
        while _health(server)["busy"] and time.monotonic() < t0 + 10:
            time.sleep(0.01)
        assert _health(server)["busy"] == 0
        assert server.metrics.requests.labels("cancelled")._value.get() == before + 1
        assert engine.chunks - chunks < 3 and sum(engine.inserted.values()) == inserted
    finally:
        del engine.prefill_next_chunk


# --------------------------------------------------------------------------- refusals

BAD = [  # (name, body or raw bytes, endpoint, status, param, words in the message)
    ("malformed JSON", b'{"model": "tiny", "prompt": ', "completions", 400, None, "not valid JSON"),
    ("not an object", [1, 2], "completions", 400, None, "JSON object"),
    ("no model", {"prompt": "hi"}, "completions", 400, "model", "'model' must be"),
    ("unknown model", {"model": "gpt-9", "prompt": "hi"}, "completions", 404, "model",
     "model 'gpt-9' does not exist"),
    ("prompt a number", {"prompt": 5}, "completions", 400, "prompt", "'prompt' must be"),
    ("empty prompt", {"prompt": ""}, "completions", 400, "prompt", "'prompt' is empty"),
    ("two prompts", {"prompt": ["a", "b"]}, "completions", 400, "prompt", "one prompt"),
    ("negative max_tokens", {"prompt": "hi", "max_tokens": -3}, "completions", 400,
     "max_tokens", "'max_tokens'=-3"),
    ("huge max_tokens", {"prompt": "hi", "max_tokens": 10**12}, "completions", 400,
     "max_tokens", "'max_tokens'=1000000000000"),
    ("max_tokens text", {"prompt": "hi", "max_tokens": "9"}, "completions", 400,
     "max_tokens", "'max_tokens' must be an integer"),
    ("max_tokens past the context", {"prompt": "hi", "max_tokens": 64}, "completions", 400,
     "max_tokens", "at most"),
    ("temperature text", {"prompt": "hi", "temperature": "hot"}, "completions", 400,
     "temperature", "'temperature' must be a number"),
    ("temperature too high", {"prompt": "hi", "temperature": 7}, "completions", 400,
     "temperature", "'temperature'=7"),
    ("top_p zero", {"prompt": "hi", "top_p": 0}, "completions", 400, "top_p", "'top_p'"),
    ("n > 1", {"prompt": "hi", "n": 2}, "completions", 400, "n", "'n'=2 is not supported"),
    ("logprobs", {"prompt": "hi", "logprobs": 3}, "completions", 400, "logprobs",
     "'logprobs'=3"),
    ("tools", {"messages": [{"role": "user", "content": "hi"}], "tools": []},
     "chat/completions", 400, "tools", "unsupported field 'tools'"),
    ("empty messages", {"messages": []}, "chat/completions", 400, "messages",
     "messages must be a non-empty list"),
    ("bad role", {"messages": [{"role": "robot", "content": "hi"}]}, "chat/completions", 400,
     "messages", "'role' must be one of"),
    ("messages a string", {"messages": "not a list"}, "chat/completions", 400, "messages",
     "messages must be a non-empty list of {'role', 'content'} objects, got a string"),
    ("messages an object", {"messages": {"role": "user", "content": "hi"}}, "chat/completions",
     400, "messages", "messages must be a non-empty list"),
    ("messages null", {"messages": None}, "chat/completions", 400, "messages",
     "messages must be a non-empty list of {'role', 'content'} objects, got null"),
    ("template kwargs a list", {"messages": [{"role": "user", "content": "hi"}],
                                "chat_template_kwargs": [1]}, "chat/completions", 400,
     "chat_template_kwargs", "chat_template_kwargs must be an object"),
    ("template kwargs reserved", {"messages": [{"role": "user", "content": "hi"}],
                                  "chat_template_kwargs": {"tokenize": False}},
     "chat/completions", 400, "chat_template_kwargs", "'tokenize' is an argument of the chat"),
    ("template kwargs on completions", {"prompt": "hi", "chat_template_kwargs": {}},
     "completions", 400, "chat_template_kwargs", "use /v1/chat/completions"),
    ("prompt on chat", {"prompt": "hi"}, "chat/completions", 400, "prompt",
     "use /v1/completions"),
    ("five stops", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "completions", 400,
     "stop", "'stop' must be"),
    ("stream not boolean", {"prompt": "hi", "stream": "yes"}, "completions", 400, "stream",
     "'stream' must be a boolean"),
    ("prompt too long", {"prompt": "cat " * 200}, "completions", 400, "prompt",
     "the limit is 63"),
    ("oversized body", {"prompt": "x" * 5000}, "completions", 413, None, "larger than 4096"),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    for name, body, endpoint, status, param, words in BAD:
        if isinstance(body, dict) and "model" not in body and name != "no model":
            body = {"model": NAME, **body}
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = httpx.post(f"{server.url}/v1/{endpoint}", content=content,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == status, (name, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, name
        assert err["param"] == param and words in err["message"], (name, err)
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(server.url + "/v1/completions").status_code == 405
    with pytest.raises(openai.BadRequestError, match="'max_tokens'=0"):
        client.completions.create(model=NAME, prompt="hi", max_tokens=0)
    assert _complete(client, "hi", False, max_tokens=3, temperature=0)[0] is not None
    assert _health(server)["status"] == "ok"


def test_chat_template_kwargs_reach_the_template(server, client, offline):
    """A template variable set by the request changes the prompt the model reads: here a
    template that writes ``prefix`` before the messages (the usage counts its tokens)."""
    template = ("{% if prefix %}{{ prefix }} {% endif %}{% for m in messages %}"
                "{{ m['content'] }}{% endfor %}")
    old = server.api.gen.tokenizer.chat_template
    server.api.gen.tokenizer.chat_template = template
    offline.tokenizer.chat_template = template
    try:
        messages = [{"role": "user", "content": "the cat"}]
        plain = client.chat.completions.create(model=NAME, messages=messages, max_tokens=2,
                                               temperature=0)
        loud = client.chat.completions.create(
            model=NAME, messages=messages, max_tokens=2, temperature=0,
            extra_body={"chat_template_kwargs": {"prefix": "a dog and"}})
        want = offline.encode(messages, chat=True, template_kwargs={"prefix": "a dog and"})
        assert want == offline.tokenizer.encode("a dog and the cat", add_special_tokens=False)
        assert loud.usage.prompt_tokens == len(want) > plain.usage.prompt_tokens
    finally:
        server.api.gen.tokenizer.chat_template = old
        offline.tokenizer.chat_template = old


def test_queue_full_and_deadline(server, client):
    server.scheduler.queue_size = 0
    try:
        r = httpx.post(server.url + "/v1/completions", json=dict(model=NAME, prompt="hi"))
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
    finally:
        server.scheduler.queue_size = 64
    server.api.deadline = 0.0
    try:
        with pytest.raises(openai.APIStatusError, match="deadline") as e:
            client.completions.create(model=NAME, prompt="hi", max_tokens=5)
        assert e.value.status_code == 504
    finally:
        server.api.deadline = 60.0
    assert _complete(client, "hi", False, max_tokens=2, temperature=0)[1] in ("length", "stop")


def test_api_key(server):
    server.api.api_key = "s3cret"
    try:
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="API key"):
            bad.models.list()
        for headers in ({}, {"Authorization": "Basic s3cret"}, {"Authorization": "s3cret"}):
            r = httpx.post(server.url + "/v1/completions", json={}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(server.url + "/metrics").status_code == 401
        assert httpx.get(server.url + "/health").status_code == 200
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in good.models.list()] == [NAME]
        assert good.completions.create(model=NAME, prompt="hi", max_tokens=2).usage
    finally:
        server.api.api_key = None


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list()] == [NAME]
    h = _health(server)
    assert h["status"] == "ok" and h["slots"] == SLOTS and h["block_size"] == 4
    # a fixed block size holds at every row count
    assert h["speculation"] == {str(rows): {"block_size": 4, "tree_budget": 0}
                                for rows in server.api.engine.row_counts}
    text = httpx.get(server.url + "/metrics").text
    assert "orthrus_block_size 4.0" in text and "orthrus_tree_budget 0.0" in text
    for name in ("orthrus_requests_total", "orthrus_generated_tokens_total",
                 "orthrus_tokens_per_iteration_bucket", "orthrus_queue_depth",
                 "orthrus_slots_busy", "orthrus_time_to_first_token_seconds_bucket",
                 "orthrus_time_per_output_token_seconds_bucket"):
        assert name in text, name
    assert 'orthrus_requests_total{outcome="ok"}' in text


# --------------------------------------------------------------------------- process


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests(folder):
    sock = _free_socket()
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "infer.serve", "--model", str(folder), "--port", str(port),
         "--slots", "2", "--max-len", "128", "--block-size", "4"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        for line in proc.stderr:
            if "serving" in line:
                break
        while proc.poll() is None:  # uvicorn binds after the banner
            try:
                httpx.get(f"http://127.0.0.1:{port}/health")
                break
            except httpx.ConnectError:
                time.sleep(0.05)
        url = f"http://127.0.0.1:{port}/v1/completions"
        with httpx.stream("POST", url, json=dict(model="m", prompt="the cat", max_tokens=100,
                                                 temperature=0, stream=True)) as r:
            lines = iter(r.iter_lines())
            next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")
        # uvicorn re-raises the signal once it has shut down
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        proc.kill()


def test_loadtest_against_the_server(server, backend_compiles):
    n0 = backend_compiles()
    items = [{"prompt": "the cat"}, {"messages": [{"role": "user", "content": "a dog"}]},
             {"prompt_ids": [5, 6, 7]}, {"prompt": "two dogs"}]
    outcomes, seconds = asyncio.run(run_load(server.url, items, concurrency=2, max_tokens=6))
    report = summarize(outcomes, seconds, mode_label="orthrus")
    assert report["errors"] == 0 and report["requests"] == 4
    assert 4 <= report["tokens"] <= 24 and report["ttft_s"]["p50"] > 0
    assert backend_compiles() == n0  # new prompts, sampling values, slots: no compile


def test_without_the_serve_extra_the_command_says_how_to_install_it(monkeypatch, capsys):
    import importlib.util

    from infer.serve import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert cli.main(["--model", "no-such-folder"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: python -m infer.serve needs the serve extra (missing: "
                          "uvicorn): pip install 'orthrus-jax[serve]'"), err


def test_bad_prefix_cache_settings_are_refused_naming_the_flag(offline):
    for kwargs, match in [(dict(prefix_cache_mb=-1.0), "--prefix-cache-mb -1.0 must be >= 0"),
                          (dict(prefix_cache_mb=1.0, prefix_block_tokens=24),
                           "--prefix-block-tokens 24 must divide --max-len 64"),
                          (dict(prefix_cache_mb=1e-6), "--prefix-cache-mb 1e-06 holds no block"),
                          (dict(warm_runs="soon"), "--warm-runs 'soon': choose one of "
                                                   "background, before, off")]:
        with pytest.raises(InputError, match=match):
            build_server(offline, slots=1, **kwargs)
