"""The HTTP application (FastAPI routes) and :func:`build_server`, which warms up the engine
and starts the scheduler."""

# No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations
# (``Request``, imported inside ``create_app``) at run time.
import asyncio
import dataclasses
import json
import math
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from infer.executables import ExecutableStore
from infer.prefix_cache import DEFAULT_BLOCK_TOKENS, block_bytes, blocks_within
from infer.serve.metrics import Metrics
from infer.serve.protocol import Api, Parsed, RequestError
from infer.serve.scheduler import Job, Scheduler, log
from infer.serve.text import TextStream
from infer.slots import SlotEngine
from orthrus_jax.cli import InputError

DEFAULT_PREFIX_CACHE_MB = 256.0
DEFAULT_PREFILL_CHUNK = 256
# When the server runs each program once (SlotEngine.exercise_one): while idle after it
# answers, before it answers, or never.
WARM_RUNS = ("background", "before", "off")


class Disconnected(Exception):
    """The client of a non-streamed request went away."""


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def create_app(api: Api, scheduler: Scheduler, metrics: Metrics):
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
        job = Job(p.prompt_ids, p.params, time.monotonic() + api.deadline,
                  asyncio.get_running_loop(), asyncio.Queue())
        scheduler.submit(job)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if p.stream:
            return StreamingResponse(stream(job, p, rid, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        async def next_event():
            while True:
                try:
                    return await asyncio.wait_for(job.events.get(), 0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        raise Disconnected from None

        parts: list[str] = []
        try:
            async for event in answer(job, p, next_event):
                if event[0] == "text":
                    parts.append(event[1])
                elif event[0] == "error":
                    raise event[1]
                else:
                    return api.final(rid, chat, "".join(parts), event[1],
                                     api.usage(p, event[2]))
        except Disconnected:
            return Response(status_code=499)
        finally:
            scheduler.cancel(job)  # no-op once finished

    async def answer(job: Job, p: Parsed, next_event) -> AsyncIterator[tuple]:
        """The request's answer as ``("text", piece)`` events, then ``("end",
        finish_reason, completion_tokens)`` or ``("error", RequestError)``: text made here,
        off the scheduler thread (:class:`~infer.serve.text.TextStream`)."""
        text = TextStream(api.gen.decode_text, p.stop)
        tokens = 0
        while True:
            event = await next_event()
            if event[0] == "error":
                yield event
                return
            _, new_ids, finish = event
            tokens += len(new_ids)
            piece, stopped = text.add(new_ids, last=finish is not None)
            if piece:
                yield "text", piece
            if stopped:
                scheduler.finish(job)
                yield "end", "stop", tokens
                return
            if finish is not None:
                yield "end", finish, tokens
                return

    async def stream(job: Job, p: Parsed, rid: str, chat: bool) -> AsyncIterator[str]:
        try:
            if chat:
                yield _sse(api.chunk(rid, chat, "", None, first=True))
            async for event in answer(job, p, job.events.get):
                if event[0] == "text":
                    yield _sse(api.chunk(rid, chat, event[1], None))
                elif event[0] == "error":
                    yield _sse(event[1].body())
                else:
                    yield _sse(api.chunk(rid, chat, None, event[1]))
                    if p.include_usage:
                        last = api.chunk(rid, chat, None, None)
                        last["choices"], last["usage"] = [], api.usage(p, event[2])
                        yield _sse(last)
            yield _sse("[DONE]")
        finally:
            scheduler.cancel(job)  # a disconnect closes the generator: free the slot

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
        s = scheduler
        status = "failed: " + s.broken if s.broken else "ok"
        index = api.engine.prefix
        prefix = None if index is None else {
            "blocks": len(index), "capacity": index.num_blocks,
            "block_tokens": index.block_tokens, "hit_rate": index.hits / max(index.queries, 1)}
        return JSONResponse({"status": status, "slots": api.engine.slots, "busy": s.busy,
                             "queue": s.queue_depth, "mode": api.engine.mode,
                             "block_size": api.engine.block,
                             "tree_budget": api.engine.tree_budget,
                             "speculation": {str(rows): {"block_size": k, "tree_budget": n}
                                             for rows, (k, n) in api.engine.plans.items()},
                             "prefix_cache": prefix,
                             "warm_runs_left": s.warm_runs_left},
                            status_code=503 if s.broken else 200)

    @app.get("/metrics")
    async def prometheus(request: Request):
        api.check_auth(request.headers.get("authorization"))
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    return app


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
                 prefix_block_tokens: int | None = None,
                 prefill_chunk_tokens: int | None = None,
                 executables: ExecutableStore | None = None,
                 warm_runs: str = "background") -> Server:
    """Warm up a :class:`SlotEngine` on ``gen`` (a :class:`~infer.engine.Generator` whose
    ``max_len`` is the cache length), start its scheduler and make the app.
    ``prefix_cache_mb``: the prefix cache's size in MiB (0: none), in blocks of
    ``prefix_block_tokens`` tokens (default: 64, or the largest divisor of ``max_len``
    below it). ``prefill_chunk_tokens`` (with the prefix cache; 0: off; default 256, in
    whole blocks): a prompt with more uncached tokens than this is prefilled that many per
    iteration, between the decode steps of the running requests. ``executables``: the
    engine's compiled programs are loaded from (and saved to) this store. ``warm_runs``
    (:data:`WARM_RUNS`): every program is run once on a throwaway prompt
    (:meth:`SlotEngine.exercise_one`), so that no request waits for a program's first run:
    ``"background"`` by the scheduler while it has nothing else to do, ``"before"``
    serving, or ``"off"``."""
    if gen.tokenizer is None:
        raise InputError("the model folder has no tokenizer: the server needs one")
    if warm_runs not in WARM_RUNS:
        raise InputError(f"--warm-runs {warm_runs!r}: choose one of {', '.join(WARM_RUNS)}")
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
    if prefill_chunk_tokens is None:
        prefill_chunk_tokens = -(-DEFAULT_PREFILL_CHUNK // prefix_block_tokens) * \
            prefix_block_tokens
    if prefill_chunk_tokens < 0:
        raise InputError(f"--prefill-chunk-tokens {prefill_chunk_tokens} must be >= 0 (0: off)")
    if not prefix_blocks:
        prefill_chunk_tokens = 0  # the chunks are stored as cached prefixes
    elif prefill_chunk_tokens % prefix_block_tokens:
        raise InputError(f"--prefill-chunk-tokens {prefill_chunk_tokens} must be a multiple "
                         f"of --prefix-block-tokens {prefix_block_tokens}")
    engine = SlotEngine(gen, slots=slots, mode=mode, block_size=block_size, eos_ids=eos_ids,
                        tree_budget=tree_budget, prefill_rows=prefill_rows,
                        prefix_blocks=prefix_blocks, prefix_block_tokens=prefix_block_tokens,
                        prefill_chunk=prefill_chunk_tokens, executables=executables)
    engine.warm_up()
    if warm_runs == "before":
        engine.exercise()
    metrics = Metrics()
    scheduler = Scheduler(engine, queue_size=queue_size, metrics=metrics,
                          warm_runs=warm_runs == "background")
    scheduler.start()
    api = Api(engine, model_name=model_name, api_key=api_key, deadline=deadline,
              max_body=max_body)
    return Server(create_app(api, scheduler, metrics), api, scheduler, metrics)
