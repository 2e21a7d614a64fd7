"""``python -m infer.loadtest``: load an OpenAI-compatible server (``infer.serve``) with
``--concurrency`` streaming clients and report throughput and latency.

Each record of ``--prompts-file`` (JSONL: ``prompt``, ``messages`` or ``prompt_ids``) is
sent once, in order, by whichever client is free: ``messages`` and text prompts to
``/v1/chat/completions`` (``--endpoint chat``, the default; ``messages`` always) or
``/v1/completions``; token ids always to ``/v1/completions``. Reported: requests/s,
generated tokens/s (server usage counts), time to first token and per-token latency after
it (p50/p90/p99), and errors.

Chats as people hold them: ``--system-file`` puts one system message before every chat
prompt (a long shared instruction or few-shot preamble), and ``--turns N`` makes each
record a conversation of ``N`` turns, each after the last answer with ``--follow-up`` as
the user's next message (the report adds time to first token per turn). Both are what a
server's prefix cache is for.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from infer.prompts import read_prompts_file
from orthrus_jax.cli import CommandError, InputError, positive_int, run_command


@dataclasses.dataclass
class Outcome:
    """One request: its text, finish reason and timings, or its error."""

    index: int
    turn: int = 0
    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0
    ttft: float | None = None  # seconds to the first text
    tpot: float | None = None  # seconds per token after the first
    start: float = 0.0  # seconds from the start of the run to the request's sending
    seconds: float | None = None  # seconds from sending to the last event
    error: str | None = None


def _request(item: dict, endpoint: str, model: str, max_tokens: int,
             temperature: float, system: str | None = None) -> tuple[str, dict]:
    body: dict = {"model": model, "max_tokens": max_tokens, "temperature": temperature,
                  "stream": True, "stream_options": {"include_usage": True}}
    if "prompt_ids" in item:
        return "/v1/completions", {**body, "prompt": item["prompt_ids"]}
    if endpoint == "chat" or "messages" in item:
        messages = item.get("messages") or [{"role": "user", "content": item["prompt"]}]
        if system is not None:
            messages = [{"role": "system", "content": system}, *messages]
        return "/v1/chat/completions", {**body, "messages": messages}
    return "/v1/completions", {**body, "prompt": item["prompt"]}


async def _one(client, index: int, path: str, body: dict, turn: int = 0) -> Outcome:
    t0 = time.perf_counter()
    out = Outcome(index, turn, start=t0)
    parts: list[str] = []
    try:
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                out.error = f"HTTP {r.status_code}: {text[:200]}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    out.error = event["error"].get("message", "error")
                    return out
                if event.get("usage"):
                    out.tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    piece = choice.get("text") or (choice.get("delta") or {}).get("content")
                    if piece:
                        if out.ttft is None:
                            out.ttft = time.perf_counter() - t0
                        parts.append(piece)
                    out.finish_reason = choice.get("finish_reason") or out.finish_reason
    except Exception as e:  # noqa: BLE001 (any transport failure is one error of the run)
        out.error = f"{type(e).__name__}: {e}"
        return out
    end = out.seconds = time.perf_counter() - t0
    out.text = "".join(parts)
    if out.ttft is not None and out.tokens > 1:
        out.tpot = (end - out.ttft) / (out.tokens - 1)
    return out


async def run_load(url: str, items: Sequence[dict], *, concurrency: int, max_tokens: int,
                   endpoint: str = "chat", model: str | None = None,
                   api_key: str | None = None, temperature: float = 0.0,
                   timeout: float = 600.0, system: str | None = None, turns: int = 1,
                   follow_up: str = "Go on.") -> tuple[list[Outcome], float]:
    """Send every item (``turns`` chat turns each, see the module doc); returns the
    outcomes (in item order, then turn) and the wall seconds."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=timeout) as client:
        if model is None:
            r = await client.get("/v1/models")
            if r.status_code != 200:
                raise CommandError(f"{url}/v1/models: HTTP {r.status_code} {r.text[:200]}")
            model = r.json()["data"][0]["id"]
        todo = list(enumerate(items))
        results: list[Outcome] = []

        async def worker() -> None:
            while todo:
                i, item = todo.pop(0)
                path, body = _request(item, endpoint, model, max_tokens, temperature, system)
                for turn in range(turns):
                    out = await _one(client, i, path, body, turn)
                    results.append(out)
                    if out.error is not None or turn == turns - 1:
                        break
                    body = {**body, "messages": [
                        *body["messages"], {"role": "assistant", "content": out.text},
                        {"role": "user", "content": follow_up}]}

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
    for out in results:
        out.start -= t0
    return sorted(results, key=lambda o: (o.index, o.turn)), seconds


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    return {f"p{q}": round(float(np.percentile(values, q)), 5) for q in (50, 90, 99)}


def summarize(outcomes: Sequence[Outcome], seconds: float, **labels) -> dict:
    """The report: labels, counts, rates and latency percentiles (seconds)."""
    ok = [o for o in outcomes if o.error is None]
    tokens = sum(o.tokens for o in ok)
    turns = sorted({o.turn for o in outcomes})
    by_turn = {} if turns == [0] else {"ttft_s_by_turn": {
        str(t + 1): _percentiles([o.ttft for o in ok if o.turn == t and o.ttft is not None])
        for t in turns}}
    return {**labels, **by_turn, "requests": len(outcomes), "errors": len(outcomes) - len(ok),
            "seconds": round(seconds, 3),
            "requests_per_s": round(len(ok) / seconds, 3) if seconds else 0.0,
            "tokens": tokens, "tokens_per_s": round(tokens / seconds, 2) if seconds else 0.0,
            "ttft_s": _percentiles([o.ttft for o in ok if o.ttft is not None]),
            "per_token_s": _percentiles([o.tpot for o in ok if o.tpot is not None]),
            "error_samples": sorted({o.error for o in outcomes if o.error})[:5]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infer.loadtest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--prompts-file", required=True, help="JSONL of {prompt|messages|prompt_ids}")
    p.add_argument("--concurrency", type=positive_int, default=1)
    p.add_argument("--max-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    p.add_argument("--limit", type=positive_int, default=None, help="first N prompts only")
    p.add_argument("--system-file", default=None,
                   help="a text file: one system message before every chat prompt")
    p.add_argument("--turns", type=positive_int, default=1,
                   help="chat turns per prompt, each after the last answer (default 1)")
    p.add_argument("--follow-up", default="Go on.",
                   help="the user's message of every turn after the first")
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--mode-label", default=None, help="a label copied into the report")
    p.add_argument("--outputs", default=None,
                   help="also write each answer as JSONL (index, turn, text, error, "
                        "finish_reason, tokens, and its timings in seconds: start, "
                        "ttft, tpot, seconds)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    items = read_prompts_file(args.prompts_file)[:args.limit]
    system = None
    if args.system_file is not None:
        try:
            system = Path(args.system_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--system-file {args.system_file}: {e}") from None
    # the records that go to /v1/completions, as _request routes them
    not_chat = [i for i, item in enumerate(items)
                if _request(item, args.endpoint, "", 1, 0.0)[0] != "/v1/chat/completions"]
    if (system is not None or args.turns > 1) and not_chat:
        raise InputError(f"--system-file and --turns need chat prompts: record "
                         f"{not_chat[0] + 1} of {args.prompts_file} goes to /v1/completions")
    outcomes, seconds = asyncio.run(run_load(
        args.url, items, concurrency=args.concurrency, max_tokens=args.max_tokens,
        endpoint=args.endpoint, model=args.model, api_key=args.api_key,
        temperature=args.temperature, system=system, turns=args.turns,
        follow_up=args.follow_up))
    report = summarize(outcomes, seconds, mode_label=args.mode_label,
                       concurrency=args.concurrency, max_tokens=args.max_tokens)
    if args.outputs:
        with open(args.outputs, "w", encoding="utf-8") as f:
            for o in outcomes:
                f.write(json.dumps({"index": o.index, "turn": o.turn, "text": o.text,
                                    "error": o.error,
                                    "finish_reason": o.finish_reason, "tokens": o.tokens,
                                    "start": round(o.start, 4), "ttft": o.ttft,
                                    "tpot": o.tpot, "seconds": o.seconds})
                        + "\n")
    if args.json:
        print(json.dumps(report))
    else:
        label = f"[{args.mode_label}] " if args.mode_label else ""
        t, lat = report["ttft_s"], report["per_token_s"]
        print(f"{label}{report['requests']} requests ({report['errors']} errors) in "
              f"{report['seconds']} s at concurrency {args.concurrency}: "
              f"{report['requests_per_s']} req/s, {report['tokens_per_s']} tokens/s\n"
              f"  time to first token p50/p90/p99: {t['p50']} / {t['p90']} / {t['p99']} s\n"
              f"  per-token latency   p50/p90/p99: {lat['p50']} / {lat['p90']} / {lat['p99']} s")
        for turn, q in report.get("ttft_s_by_turn", {}).items():
            print(f"  turn {turn}: time to first token p50/p90/p99: {q['p50']} / {q['p90']} / "
                  f"{q['p99']} s")
        for e in report["error_samples"]:
            print(f"  error: {e}", file=sys.stderr)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
