"""``python -m infer.serve``: an OpenAI-compatible HTTP server over continuous batching.

One scheduler thread owns the :class:`~infer.slots.SlotEngine` and makes every JAX call:
it admits queued requests into the lowest free slots (prefilled together), runs the
compiled decode loop one iteration at a time over the busy slots, and hands each request
its newly committed text.
HTTP handlers (FastAPI on uvicorn, asyncio) only parse, queue and relay. See
docs/serving.md.
"""

import argparse
import asyncio
import collections
import dataclasses
import hmac
import json
import logging
import math
import secrets
import sys
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from infer.compile_cache import add_compile_cache_args, enable_compile_cache_from
from infer.prefix_cache import DEFAULT_BLOCK_TOKENS, block_bytes, blocks_within
from infer.prompts import check_messages, check_template_kwargs
from infer.sampling import MAX_TOP_K
from infer.slots import SlotEngine, SlotParams
from orthrus_jax.cli import (
    CommandError,
    InputError,
    non_negative_int,
    positive_int,
    run_command,
)

log = logging.getLogger("infer.serve")

FINISH_TO_OPENAI = {"eos": "stop", "length": "length", "cache_full": "length"}
MAX_STOPS = 4
DEFAULT_COMPLETION_TOKENS = 16  # the OpenAI default of /v1/completions
DEFAULT_PREFIX_CACHE_MB = 256.0


class RequestError(InputError):
    """A request refused with an HTTP ``status`` and an OpenAI error body."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400,
                 code: str | None = None, type_: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.type = status, param, code, type_
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param,
                          "code": self.code}}


# ---------------------------------------------------------------------------- metrics
class Metrics:
    """Prometheus metrics of one server (own registry)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("orthrus_requests", "Requests by outcome", ["outcome"],
                                registry=r)
        self.tokens = Counter("orthrus_generated_tokens", "Generated tokens", registry=r)
        self.tokens_per_iteration = Histogram(
            "orthrus_tokens_per_iteration", "Tokens a slot committed per decode iteration",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32), registry=r)
        self.queue = Gauge("orthrus_queue_depth", "Requests waiting for a slot", registry=r)
        self.busy = Gauge("orthrus_slots_busy", "Slots holding a request", registry=r)
        self.ttft = Histogram("orthrus_time_to_first_token_seconds",
                              "Arrival to first token", registry=r)
        self.prefix_queries = Counter("orthrus_prefix_cache_queries",
                                      "Prompt tokens looked up in the prefix cache", registry=r)
        self.prefix_hits = Counter("orthrus_prefix_cache_hits",
                                   "Prompt tokens whose K/V came from the prefix cache",
                                   registry=r)
        self.prefix_blocks = Gauge("orthrus_prefix_cache_blocks",
                                   "Blocks held by the prefix cache", registry=r)
        self.tpot = Histogram("orthrus_time_per_output_token_seconds",
                              "Seconds per output token after the first", registry=r,
                              buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))

    def text(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)


# ---------------------------------------------------------------------------- scheduler
@dataclasses.dataclass(eq=False)
class Job:
    """One request between its handler and the scheduler. ``events`` receives
    ``("text", delta)``, then ``("end", finish_reason, completion_tokens)`` or
    ``("error", RequestError)``."""

    prompt_ids: list[int]
    params: SlotParams
    stop: tuple[str, ...]
    deadline: float  # time.monotonic() limit
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    created: float = dataclasses.field(default_factory=time.monotonic)
    cancelled: bool = False
    ids: list[int] = dataclasses.field(default_factory=list)
    emitted: int = 0  # characters of text sent
    first_at: float | None = None

    def send(self, *event: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def holdback(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of ``text`` that could begin a stop string (or complete an
    incomplete UTF-8 character, shown as U+FFFD): not safe to send yet."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    tail = len(text) - len(text.rstrip("\ufffd"))
    return max(n, tail)


class Scheduler:
    """The thread that owns ``engine``; ``decode(ids) -> text``."""

    def __init__(self, engine: SlotEngine, decode: Callable[[list[int]], str], *,
                 queue_size: int, metrics: Metrics):
        self.engine, self.decode, self.queue_size, self.metrics = engine, decode, queue_size, \
            metrics
        self._pending: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._jobs: dict[int, Job] = {}  # slot -> job
        self._closing = False
        self._closing_requested = False  # draining: no new requests
        self.broken: str | None = None
        self._prefix_seen = (0, 0)  # prefix-cache queries and hits already counted
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def busy(self) -> int:
        return len(self._jobs)

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closing or self._closing_requested or self.broken:
                raise RequestError("the server is shutting down", status=503,
                                   type_="server_error", code="unavailable")
            if len(self._pending) >= self.queue_size:
                self.metrics.requests.labels("rejected").inc()
                raise RequestError(f"the queue is full ({self.queue_size} requests waiting); "
                                   "retry later", status=429, type_="rate_limit_error",
                                   code="queue_full", headers={"Retry-After": "1"})
            self._pending.append(job)
            self.metrics.queue.set(len(self._pending))
            self._cv.notify()

    def drain(self) -> None:
        """Refuse new requests (503) and let the queued and running ones finish: each
        ends by its deadline at the latest."""
        with self._cv:
            self._closing_requested = True

    def cancel(self, job: Job) -> None:
        """The client went away: free its slot at the next iteration (or skip it)."""
        with self._cv:
            job.cancelled = True
            self._cv.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread and fail whatever is still queued or decoding (503)."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout)
        err = RequestError("the server shut down before this request finished", status=503,
                           type_="server_error", code="shutdown")
        for job in list(self._pending) + list(self._jobs.values()):
            self._fail(job, err, "shutdown")
        self._pending.clear()
        self._jobs.clear()

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._closing or self._pending or self._jobs):
                        self._cv.wait()
                    if self._closing:
                        return
                    free = self.engine.free_slots()
                    admit = [self._pending.popleft() for _ in range(min(len(free),
                                                                        len(self._pending)))]
                    self.metrics.queue.set(len(self._pending))
                self._admit_many(list(zip(free, admit, strict=False)))
                if self._jobs:
                    for u in self.engine.step(1):
                        self.metrics.tokens_per_iteration.observe(len(u.new_ids))
                        self._update(self._jobs[u.slot], u.slot, u.new_ids, u.finish_reason)
                self._sweep()
                self._count_prefix()
        except Exception as e:  # noqa: BLE001 (a failed device call: fail every request)
            self.broken = f"{type(e).__name__}: {e}"
            log.error("scheduler failed:\n%s", traceback.format_exc())
            err = RequestError(f"internal error: {self.broken}", status=500,
                               type_="server_error")
            with self._cv:
                for job in list(self._pending) + list(self._jobs.values()):
                    self._fail(job, err, "error")
                self._pending.clear()
                self._jobs.clear()

    def _count_prefix(self) -> None:
        index = self.engine.prefix
        if index is None:
            return
        queries, hits = self._prefix_seen
        self.metrics.prefix_queries.inc(index.queries - queries)
        self.metrics.prefix_hits.inc(index.hits - hits)
        self.metrics.prefix_blocks.set(len(index))
        self._prefix_seen = (index.queries, index.hits)

    def _admit_many(self, pairs: list[tuple[int, Job]]) -> None:
        """Admit jobs into their slots, ``--prefill-rows`` at a time prefilled together
        (``SlotEngine.insert_many``), each group's first tokens sent as soon as it is
        done."""
        live = [(slot, job) for slot, job in pairs if self._admissible(job)]
        n = self.engine.prefill_rows
        for i in range(0, len(live), n):
            self._admit(live[i:i + n])

    def _admissible(self, job: Job) -> bool:
        """Whether ``job`` is still wanted (counted and answered here if not)."""
        if job.cancelled:
            self.metrics.requests.labels("cancelled").inc()
            return False
        if time.monotonic() > job.deadline:
            self._fail(job, _deadline_error(), "timeout")
            return False
        return True

    def _admit(self, group: list[tuple[int, Job]]) -> None:
        """Prefill ``group`` together; if the engine refuses one of several, each is
        admitted alone, so only that one fails."""
        try:
            updates = self.engine.insert_many([(slot, job.prompt_ids, job.params)
                                               for slot, job in group])
        except ValueError as e:  # checked by Api.parse already; never a crash
            if len(group) > 1:
                for one in group:
                    self._admit([one])
            else:
                self._fail(group[0][1], RequestError(str(e)), "bad_request")
            return
        for (slot, job), u in zip(group, updates, strict=True):
            self._jobs[slot] = job
            self.metrics.busy.set(len(self._jobs))
            self._update(job, slot, u.new_ids, u.finish_reason)

    def _sweep(self) -> None:
        now = time.monotonic()
        for slot, job in list(self._jobs.items()):
            if job.cancelled:
                self._release(slot)
                self.metrics.requests.labels("cancelled").inc()
            elif now > job.deadline:
                self._release(slot)
                self._fail(job, _deadline_error(), "timeout")

    def _release(self, slot: int) -> None:
        self.engine.free(slot)
        del self._jobs[slot]
        self.metrics.busy.set(len(self._jobs))

    def _fail(self, job: Job, err: RequestError, outcome: str) -> None:
        self.metrics.requests.labels(outcome).inc()
        job.send("error", err)

    def _update(self, job: Job, slot: int, new_ids: list[int], finish: str | None) -> None:
        """Send the text that is safe to send; end the job at EOS, its budget or a stop
        string, freeing its slot."""
        now = time.monotonic()
        if new_ids and job.first_at is None:
            job.first_at = now
            self.metrics.ttft.observe(now - job.created)
        job.ids += new_ids
        self.metrics.tokens.inc(len(new_ids))
        text = self.decode(job.ids)
        reason = None if finish is None else FINISH_TO_OPENAI[finish]
        longest = max((len(s) for s in job.stop), default=0)
        hits = [i for s in job.stop
                if (i := text.find(s, max(0, job.emitted - longest + 1))) >= 0]
        if hits:
            text, reason = text[:min(hits)], "stop"
        cut = len(text) if reason else len(text) - holdback(text, job.stop)
        if cut > job.emitted:
            job.send("text", text[job.emitted:cut])
            job.emitted = cut
        if reason is None:
            return
        self._release(slot)
        if len(job.ids) > 1:
            self.metrics.tpot.observe((now - job.first_at) / (len(job.ids) - 1))
        self.metrics.requests.labels("ok").inc()
        job.send("end", reason, len(job.ids))


def _deadline_error() -> RequestError:
    return RequestError("the request deadline passed before it finished", status=504,
                        type_="timeout_error", code="deadline_exceeded")


# ---------------------------------------------------------------------------- requests
ALLOWED = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
           "top_p", "top_k", "seed", "stop", "stream", "stream_options", "user", "n",
           "logprobs", "top_logprobs", "echo", "best_of", "presence_penalty",
           "frequency_penalty", "logit_bias", "suffix", "chat_template_kwargs"}
# accepted only at the value that changes nothing
NEUTRAL = {"n": (1,), "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (False,),
           "best_of": (1,), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0),
           "logit_bias": (None, {}), "suffix": (None, "")}


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise RequestError(f"'{name}' must be a number, got {json.dumps(v)[:40]}", name)
    if not low <= v <= high:
        raise RequestError(f"'{name}'={v} must be in [{low}, {high}]", name)
    return float(v)


def _integer(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"'{name}' must be an integer, got {json.dumps(v)[:40]}", name)
    if not low <= v <= high:
        raise RequestError(f"'{name}'={v} must be in [{low}, {high}]", name)
    return v


@dataclasses.dataclass
class Parsed:
    prompt_ids: list[int]
    params: SlotParams
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


class Api:
    """Request parsing and responses around a :class:`Scheduler`."""

    def __init__(self, scheduler: Scheduler, *, model_name: str, api_key: str | None,
                 deadline: float, max_body: int):
        self.scheduler, self.engine = scheduler, scheduler.engine
        self.gen = self.engine.gen
        self.model_name, self.api_key = model_name, api_key
        self.deadline, self.max_body = deadline, max_body
        self.created = int(time.time())

    def check_auth(self, authorization: str | None) -> None:
        if self.api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                  self.api_key.encode()):
            raise RequestError("missing or wrong API key (Authorization: Bearer KEY)",
                               status=401, code="invalid_api_key")

    def parse(self, body: Any, chat: bool) -> Parsed:
        """The request's prompt ids and settings; a :class:`RequestError` naming the field
        otherwise."""
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        unknown = sorted(set(body) - ALLOWED)
        for name in sorted(set(body) & set(NEUTRAL)):
            v = body[name]
            if not any(type(v) is type(x) and v == x for x in NEUTRAL[name]):
                raise RequestError(f"'{name}'={json.dumps(body[name])[:40]} is not supported "
                                   f"(only {NEUTRAL[name][0]!r})", name, code="unsupported")
        wrong = "prompt" if chat else "messages"
        if not chat and "chat_template_kwargs" in body:
            wrong = "chat_template_kwargs"
        if wrong in body:
            raise RequestError(f"'{wrong}' is not a field of this endpoint (use "
                               f"{'/v1/completions' if chat else '/v1/chat/completions'})",
                               wrong)
        if unknown:
            raise RequestError(f"unsupported field '{unknown[0]}'", unknown[0],
                               code="unsupported")
        model = body.get("model")
        if not isinstance(model, str):
            raise RequestError("'model' must be a string naming the model "
                               f"('{self.model_name}')", "model")
        if model != self.model_name:
            raise RequestError(f"model '{model[:80]}' does not exist; this server has "
                               f"'{self.model_name}'", "model", status=404,
                               code="model_not_found")
        ids = self._messages(body.get("messages"), body.get("chat_template_kwargs")) if chat \
            else self._prompt(body.get("prompt"))
        field = "messages" if chat else "prompt"
        L = self.engine.max_len
        if len(ids) >= L:
            raise RequestError(f"'{field}' has {len(ids)} tokens; the limit is {L - 1} (the "
                               f"context holds {L} tokens)", field,
                               code="context_length_exceeded")
        room = L - len(ids)
        names = ["max_tokens"] + (["max_completion_tokens"] if chat else [])
        name = next((n for n in names if body.get(n) is not None), "max_tokens")
        default = room if chat else min(DEFAULT_COMPLETION_TOKENS, room)
        max_tokens = _integer(body, name, default, 1, 2**31 - 1)
        if max_tokens > room:
            raise RequestError(f"'{name}'={max_tokens} is too large: the prompt has {len(ids)} "
                               f"tokens and the context holds {L}, so at most {room}", name,
                               code="context_length_exceeded")
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)  # OpenAI's default: 1
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        if top_p == 0.0:
            raise RequestError("'top_p'=0 must be > 0", "top_p")
        top_k = _integer(body, "top_k", 0, 0, MAX_TOP_K)
        seed = _integer(body, "seed", None, 0, 2**31 - 1)
        if seed is None:  # no seed: fresh draws every time (reproducible only with one)
            seed = secrets.randbelow(2**31)
        stop = body.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(
                isinstance(s, str) and s for s in stop):
            raise RequestError(f"'stop' must be a non-empty string or a list of at most "
                               f"{MAX_STOPS} of them", "stop")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError("'stream' must be a boolean", "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict) or set(options) - {"include_usage"} or not isinstance(
                options.get("include_usage", False), bool):
            raise RequestError("'stream_options' may only hold 'include_usage' (a boolean)",
                               "stream_options")
        params = SlotParams(max_tokens, temperature, top_k, top_p, seed)
        return Parsed(ids, params, tuple(stop), stream, bool(options.get("include_usage")))

    def _prompt(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.gen.encode(prompt) if prompt else []
        elif isinstance(prompt, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            V = self.gen.config.vocab_size
            if any(not 0 <= t < V for t in prompt):
                raise RequestError(f"'prompt' token ids must be in [0, {V})", "prompt")
            ids = list(prompt)
        else:
            raise RequestError("'prompt' must be a string or a list of token ids (one prompt "
                               "per request)", "prompt")
        if not ids:
            raise RequestError("'prompt' is empty", "prompt")
        return ids

    def _messages(self, messages: Any, template_kwargs: Any) -> list[int]:
        try:
            template_kwargs = check_template_kwargs(template_kwargs)
        except ValueError as e:
            raise RequestError(str(e), "chat_template_kwargs") from None
        try:
            check_messages(messages)  # an array, as the API requires (not a lone string)
            return self.gen.encode(messages, chat=True, template_kwargs=template_kwargs)
        except ValueError as e:  # InputError from check_messages; no chat template
            raise RequestError(str(e), "messages") from None

    # ------------------------------------------------------------------ responses
    def submit(self, p: Parsed) -> Job:
        job = Job(p.prompt_ids, p.params, p.stop, time.monotonic() + self.deadline,
                  asyncio.get_running_loop(), asyncio.Queue())
        self.scheduler.submit(job)
        return job

    def usage(self, p: Parsed, completion: int) -> dict:
        n = len(p.prompt_ids)
        return {"prompt_tokens": n, "completion_tokens": completion,
                "total_tokens": n + completion}

    def chunk(self, rid: str, chat: bool, delta: str | None, finish: str | None,
              first: bool = False) -> dict:
        if chat:
            d: dict = {"role": "assistant", "content": delta or ""} if first else (
                {} if delta is None else {"content": delta})
            choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None,
                      "finish_reason": finish}
        return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_name, "choices": [choice]}

    def final(self, rid: str, chat: bool, text: str, finish: str, usage: dict) -> dict:
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_name, "choices": [choice],
                "usage": usage}


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def create_app(api: Api, metrics: Metrics):
    """The FastAPI application (routes under ``/v1``, ``/health``, ``/metrics``)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="orthrus-jax", docs_url=None, redoc_url=None, openapi_url=None)

    def error(e: RequestError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError):
        return error(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        return error(RequestError(f"{request.method} {request.url.path}: {e.detail}",
                                  status=e.status_code))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):  # the response, not a crash
        log.error("internal error:\n%s", traceback.format_exc())
        return error(RequestError(f"internal error: {type(e).__name__}", status=500,
                                  type_="server_error"))

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > api.max_body):
            raise RequestError(f"the request body is larger than {api.max_body} bytes",
                               status=413, code="body_too_large")
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > api.max_body:
                raise RequestError(f"the request body is larger than {api.max_body} bytes",
                                   status=413, code="body_too_large")
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON ({e})") from None

    async def complete(request: Request, chat: bool):
        api.check_auth(request.headers.get("authorization"))
        body = await read_json(request)
        try:
            p = api.parse(body, chat)
        except RequestError:
            metrics.requests.labels("bad_request").inc()
            raise
        job = api.submit(p)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if p.stream:
            return StreamingResponse(stream(job, p, rid, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        parts: list[str] = []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(job.events.get(), 0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        api.scheduler.cancel(job)
                        return Response(status_code=499)
                    continue
                if event[0] == "text":
                    parts.append(event[1])
                elif event[0] == "error":
                    raise event[1]
                else:
                    return api.final(rid, chat, "".join(parts), event[1],
                                     api.usage(p, event[2]))
        finally:
            api.scheduler.cancel(job)  # no-op once finished

    async def stream(job: Job, p: Parsed, rid: str, chat: bool) -> AsyncIterator[str]:
        try:
            if chat:
                yield _sse(api.chunk(rid, chat, "", None, first=True))
            while True:
                event = await job.events.get()
                if event[0] == "text":
                    yield _sse(api.chunk(rid, chat, event[1], None))
                elif event[0] == "error":
                    yield _sse(event[1].body())
                    break
                else:
                    yield _sse(api.chunk(rid, chat, None, event[1]))
                    if p.include_usage:
                        last = api.chunk(rid, chat, None, None)
                        last["choices"], last["usage"] = [], api.usage(p, event[2])
                        yield _sse(last)
                    break
            yield _sse("[DONE]")
        finally:
            api.scheduler.cancel(job)  # a disconnect closes the generator: free the slot

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.get("/v1/models")
    async def models(request: Request):
        api.check_auth(request.headers.get("authorization"))
        return {"object": "list", "data": [{"id": api.model_name, "object": "model",
                                            "created": api.created, "owned_by": "orthrus-jax"}]}

    @app.get("/health")
    async def health():
        s = api.scheduler
        status = "failed: " + s.broken if s.broken else "ok"
        index = api.engine.prefix
        prefix = None if index is None else {
            "blocks": len(index), "capacity": index.num_blocks,
            "block_tokens": index.block_tokens, "hit_rate": index.hits / max(index.queries, 1)}
        return JSONResponse({"status": status, "slots": api.engine.slots, "busy": s.busy,
                             "queue": s.queue_depth, "mode": api.engine.mode,
                             "block_size": api.engine.block,
                             "tree_budget": api.engine.tree_budget, "prefix_cache": prefix},
                            status_code=503 if s.broken else 200)

    @app.get("/metrics")
    async def prometheus(request: Request):
        api.check_auth(request.headers.get("authorization"))
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    return app


# ---------------------------------------------------------------------------- server
@dataclasses.dataclass
class Server:
    """A built server: engine warmed up, scheduler started, app ready for uvicorn."""

    app: Any
    api: Api
    scheduler: Scheduler
    metrics: Metrics

    def close(self) -> None:
        self.scheduler.stop()


def build_server(gen, *, slots: int, mode: str = "orthrus", block_size: int | str | None = None,
                 model_name: str = "model", api_key: str | None = None, queue_size: int = 64,
                 deadline: float = 600.0, max_body: int = 1 << 20,
                 eos_ids: Sequence[int] | None = None,
                 tree_budget: int | str | None = None, prefill_rows: int = 1,
                 prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
                 prefix_block_tokens: int | None = None) -> Server:
    """Warm up a :class:`SlotEngine` on ``gen`` (a :class:`~infer.engine.Generator` whose
    ``max_len`` is the cache length), start its scheduler and make the app.
    ``prefix_cache_mb``: the prefix cache's size in MiB (0: none), in blocks of
    ``prefix_block_tokens`` tokens (default: 64, or the largest divisor of ``max_len``
    below it)."""
    if gen.tokenizer is None:
        raise InputError("the model folder has no tokenizer: the server needs one")
    if not prefix_cache_mb >= 0:
        raise InputError(f"--prefix-cache-mb {prefix_cache_mb} must be >= 0 (0: off)")
    prefix_blocks = 0
    if prefix_block_tokens is None:
        prefix_block_tokens = math.gcd(gen.max_len, DEFAULT_BLOCK_TOKENS)
    if prefix_cache_mb > 0:
        if gen.max_len % prefix_block_tokens:
            raise InputError(f"--prefix-block-tokens {prefix_block_tokens} must divide "
                             f"--max-len {gen.max_len}")
        prefix_blocks = blocks_within(gen.config, prefix_cache_mb, prefix_block_tokens)
        if prefix_blocks < 1:
            each = block_bytes(gen.config, prefix_block_tokens) / 2**20
            raise InputError(f"--prefix-cache-mb {prefix_cache_mb} holds no block of "
                             f"{prefix_block_tokens} tokens ({each:.2f} MiB each)")
    engine = SlotEngine(gen, slots=slots, mode=mode, block_size=block_size, eos_ids=eos_ids,
                        tree_budget=tree_budget, prefill_rows=prefill_rows,
                        prefix_blocks=prefix_blocks, prefix_block_tokens=prefix_block_tokens)
    engine.warm_up()
    metrics = Metrics()
    scheduler = Scheduler(engine, gen.decode_text, queue_size=queue_size, metrics=metrics)
    scheduler.start()
    api = Api(scheduler, model_name=model_name, api_key=api_key, deadline=deadline,
              max_body=max_body)
    return Server(create_app(api, metrics), api, scheduler, metrics)


def build_parser() -> argparse.ArgumentParser:
    from infer.buckets import MODES
    from infer.options import parse_block_size, parse_tree_budget
    from orthrus_jax.config import DTYPE_NAMES

    p = argparse.ArgumentParser(prog="python -m infer.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="model folder; default: SmolLM2-135M-Instruct with the shipped head")
    p.add_argument("--served-model-name", default=None,
                   help="the name clients pass as 'model' (default: the folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=non_negative_int, default=8000)
    p.add_argument("--slots", type=positive_int, default=8,
                   help="requests decoding at once (rows of the compiled loop)")
    p.add_argument("--max-len", type=positive_int, default=2048,
                   help="KV cache length per slot: prompt + output tokens")
    p.add_argument("--prefill-rows", type=positive_int, default=1,
                   help="queued prompts prefilled together by one program (default 1: on a "
                        "CPU a prefill is compute-bound and batching it only delays first "
                        "tokens; more pays on a GPU)")
    p.add_argument("--prefix-cache-mb", type=float, default=DEFAULT_PREFIX_CACHE_MB,
                   help="MiB of K/V kept for prompt prefixes (system prompts, a chat's earlier "
                        "turns) that later requests reuse instead of prefilling; 0: off "
                        f"(default {DEFAULT_PREFIX_CACHE_MB:g})")
    p.add_argument("--prefix-block-tokens", type=positive_int, default=None,
                   help="tokens per prefix-cache block (a prefix is reused in whole blocks; "
                        f"must divide --max-len; default {DEFAULT_BLOCK_TOKENS}, or the largest "
                        "divisor of --max-len below it)")
    p.add_argument("--mode", choices=MODES, default="orthrus")
    p.add_argument("--block-size", type=parse_block_size, default=None,
                   help="Orthrus block, fixed for all requests: 'auto' (resolved once at "
                        "start-up) or 1..K (default: auto with an acceptance profile, else K)")
    p.add_argument("--tree-budget", type=parse_tree_budget, default=None,
                   help="verify draft trees of N drafted nodes instead of chains (every slot "
                        "holds N + 1 verify rows): 1..N, 0 = plain AR steps, 'none' = chains, "
                        "or 'auto' "
                        "(resolved once at start-up with the block size); default: auto where "
                        "the block size is auto and the acceptance profile measured trees, "
                        "else chains")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="parameter dtype (default: as stored; bfloat16 and float16 decode in "
                        "float32 on CPU)")
    p.add_argument("--compute-dtype", choices=DTYPE_NAMES, default=None,
                   help="activations, KV cache and accumulation (default: the parameter "
                        "dtype); --dtype bfloat16 --compute-dtype float32: bfloat16 weights, "
                        "float32 compute, greedy Orthrus output equal to AR's")
    p.add_argument("--mesh", default=None, help="shard the model, e.g. tensor=2")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--queue-size", type=positive_int, default=64,
                   help="requests waiting for a slot before 429")
    p.add_argument("--deadline", type=float, default=600.0,
                   help="seconds a request may take, queue included (504 past it)")
    p.add_argument("--max-body", type=positive_int, default=1 << 20,
                   help="largest request body in bytes (413 past it)")
    add_compile_cache_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    enable_compile_cache_from(args)
    return run_command(lambda: _main(args))


SERVE_MODULES = ("fastapi", "uvicorn", "prometheus_client")


def check_serve_extra() -> None:
    """Refuse, before loading anything, when the ``serve`` extra is not installed."""
    import importlib.util

    missing = [m for m in SERVE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise CommandError(f"python -m infer.serve needs the serve extra (missing: "
                           f"{', '.join(missing)}): pip install 'orthrus-jax[serve]'")


def _main(args: argparse.Namespace) -> int:
    check_serve_extra()
    import uvicorn

    from infer.default_model import default_model_dir
    from infer.engine import Generator, check_dtypes
    from infer.options import resolve_tree_budget
    from orthrus_jax.sharding import make_mesh

    if not args.deadline > 0:
        raise InputError(f"--deadline {args.deadline} must be > 0")
    if args.dtype is not None:  # a bad pair fails before loading
        check_dtypes(args.dtype, args.compute_dtype)
    mesh = make_mesh(args.mesh) if args.mesh else None
    model_dir = args.model or default_model_dir()
    gen = Generator.load(model_dir, dtype=args.dtype, compute_dtype=args.compute_dtype,
                         mesh=mesh, max_len=args.max_len)
    block = args.block_size if args.block_size is not None else (
        "auto" if gen.profile is not None and args.mode == "orthrus" else None)
    t0 = time.perf_counter()
    print(f"warming up: {args.slots} slots, cache {args.max_len}, mode {args.mode}, "
          f"{gen.describe_dtypes()}",
          file=sys.stderr, flush=True)
    if args.mode == "ar" and args.tree_budget not in (None, "none"):
        raise InputError("--tree-budget applies to --mode orthrus only")
    server = build_server(gen, slots=args.slots, mode=args.mode, block_size=block,
                          tree_budget=resolve_tree_budget(args.tree_budget, block, gen),
                          model_name=args.served_model_name or Path(model_dir).name,
                          api_key=args.api_key, queue_size=args.queue_size,
                          deadline=args.deadline, max_body=args.max_body,
                          prefill_rows=args.prefill_rows,
                          prefix_cache_mb=args.prefix_cache_mb,
                          prefix_block_tokens=args.prefix_block_tokens)
    tree = server.api.engine.tree_budget
    trees = f", trees of {tree} nodes" if tree else ""
    print(f"compiled in {time.perf_counter() - t0:.1f} s (block size "
          f"{server.api.engine.block}{trees}); serving '{server.api.model_name}' on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    class Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # SIGTERM / SIGINT
            server.scheduler.drain()
            super().handle_exit(sig, frame)

    # every request ends by its deadline: the graceful shutdown waits that long, plus slack
    config = uvicorn.Config(server.app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=int(math.ceil(args.deadline)) + 5)
    try:
        Uvicorn(config).run()  # then uvicorn re-raises the signal (exit status -SIGTERM)
    finally:
        server.close()  # fail whatever is left (503)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
