"""``python -m infer.loadtest`` against a stand-in OpenAI server (no model: fixed SSE
answers, one refused prompt), over real HTTP on 127.0.0.1. The load generator against the
real server runs in tests/infer/test_serve.py."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from infer.loadtest import main

SEEN: list[dict] = []  # the bodies the stand-in server received


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake", "object": "model"}]}

    async def answer(request: Request, chat: bool):
        body = await request.json()
        SEEN.append(body)
        assert body["model"] == "fake" and body["stream"] is True
        prompt = json.dumps(body.get("messages") or body.get("prompt"))
        if "refuse" in prompt:
            return JSONResponse({"error": {"message": "no", "type": "x", "param": None,
                                           "code": None}}, status_code=400)

        def piece(text, finish=None):
            choice = ({"delta": {"content": text}} if chat else {"text": text})
            return "data: " + json.dumps({"choices": [{**choice, "index": 0,
                                                         "finish_reason": finish}]}) + "\n\n"

        async def events():
            for word in ("one ", "two ", "three"):
                yield piece(word)
            yield piece("", "length")
            yield "data: " + json.dumps({"choices": [], "usage": {
                "prompt_tokens": 1, "completion_tokens": body["max_tokens"],
                "total_tokens": 1 + body["max_tokens"]}}) + "\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await answer(request, True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, False)

    return app


@pytest.fixture(scope="module")
def url():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(_app(), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)


def test_report_counts_tokens_latencies_and_errors(url, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "a"}, {"messages": [{"role": "user", "content": "b"}]},
        {"prompt_ids": [1, 2]}, {"prompt": "refuse this"}, {"prompt": "c"}]) + "\n")
    outputs = tmp_path / "out.jsonl"
    status = main(["--url", url, "--prompts-file", str(prompts), "--concurrency", "3",
                   "--max-tokens", "5", "--mode-label", "fake", "--json",
                   "--outputs", str(outputs)])
    assert status == 1  # one request failed
    report = json.loads(capsys.readouterr().out)
    assert report["mode_label"] == "fake" and report["concurrency"] == 3
    assert (report["requests"], report["errors"], report["tokens"]) == (5, 1, 20)
    assert report["tokens_per_s"] > 0 and report["requests_per_s"] > 0
    for key in ("ttft_s", "per_token_s"):
        p = report[key]
        assert 0 < p["p50"] <= p["p90"] <= p["p99"], key
    assert "HTTP 400" in report["error_samples"][0]
    rows = [json.loads(line) for line in outputs.read_text().splitlines()]
    assert [r["text"] for r in rows] == ["one two three"] * 3 + ["", "one two three"]
    assert rows[0]["finish_reason"] == "length" and rows[3]["error"]
    for r in rows[:3] + rows[4:]:  # each answer's own timeline, within the run's
        assert r["start"] >= 0 and 0 < r["ttft"] <= r["seconds"] < report["seconds"]
        # (the report's seconds are rounded to 1 ms)
        assert r["start"] + r["seconds"] <= report["seconds"] + 1e-3 and r["tpot"] > 0
    assert sorted(r["start"] for r in rows)[3] > 0  # the fourth waited for a free client

    assert main(["--url", url, "--prompts-file", str(prompts), "--limit", "2",
                 "--endpoint", "completions"]) == 0
    assert "2 requests (0 errors)" in capsys.readouterr().out


def test_bad_arguments(tmp_path, capsys):
    assert main(["--url", "http://127.0.0.1:9", "--prompts-file",
                 str(tmp_path / "none.jsonl")]) == 2
    assert "prompts file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--url", "x", "--prompts-file", "y", "--concurrency", "0"])


def test_a_shared_system_message_and_conversations_of_several_turns(url, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "b"}]}) + "\n")
    system = tmp_path / "system.txt"
    system.write_text("be brief\n")
    outputs = tmp_path / "out.jsonl"
    SEEN.clear()
    assert main(["--url", url, "--prompts-file", str(prompts), "--system-file", str(system),
                 "--turns", "3", "--follow-up", "more", "--json", "--outputs",
                 str(outputs)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["requests"] == 6 and set(report["ttft_s_by_turn"]) == {"1", "2", "3"}
    rows = [json.loads(line) for line in outputs.read_text().splitlines()]
    assert [(r["index"], r["turn"]) for r in rows] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1),
                                                       (1, 2)]
    first, second, third = SEEN[:3]  # one client: the first conversation, turn by turn
    sys_msg = {"role": "system", "content": "be brief\n"}
    assert first["messages"] == [sys_msg, {"role": "user", "content": "a"}]
    assert second["messages"] == first["messages"] + [
        {"role": "assistant", "content": "one two three"}, {"role": "user", "content": "more"}]
    assert third["messages"][:-2] == second["messages"]
    # token-id prompts go to /v1/completions: no system message, no turns
    ids = tmp_path / "ids.jsonl"
    ids.write_text(json.dumps({"prompt_ids": [1, 2]}) + "\n")
    assert main(["--url", url, "--prompts-file", str(ids), "--turns", "2"]) == 2
    assert "--system-file and --turns need chat prompts: record 1" in capsys.readouterr().err
    assert main(["--url", url, "--prompts-file", str(prompts), "--system-file",
                 str(tmp_path / "none.txt")]) == 2
    assert "--system-file" in capsys.readouterr().err
