"""The OpenAI protocol of the server: request validation (every refusal a
:class:`RequestError` naming its field, with the HTTP status and OpenAI error body) and the
shapes of answers and stream chunks."""

from __future__ import annotations

import dataclasses
import hmac
import json
import math
import secrets
import time
from typing import Any

from infer.prompts import check_messages, check_template_kwargs
from infer.sampling import MAX_TOP_K
from infer.slots import SlotEngine, SlotParams
from orthrus_jax.cli import InputError

MAX_STOPS = 4
DEFAULT_COMPLETION_TOKENS = 16  # the OpenAI default of /v1/completions


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
    """Request parsing and responses for the model of ``engine``."""

    def __init__(self, engine: SlotEngine, *, model_name: str, api_key: str | None,
                 deadline: float, max_body: int):
        self.engine = engine
        self.gen = engine.gen
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



def deadline_error() -> RequestError:
    return RequestError("the request deadline passed before it finished", status=504,
                        type_="timeout_error", code="deadline_exceeded")
