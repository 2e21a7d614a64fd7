"""An OpenAI-compatible HTTP server over continuous batching (``python -m infer.serve``).

One scheduler thread owns the :class:`~infer.slots.SlotEngine` and makes every JAX call:
it admits queued requests into the lowest free slots, runs the compiled decode loop one
iteration at a time over the busy slots, and hands each request its new token ids.
HTTP handlers (FastAPI on uvicorn, asyncio) parse and queue requests and make the text of
each answer as its tokens arrive. The package, by seam:

- ``protocol``: request validation (every refusal names its field) and response shapes;
- ``scheduler``: the queue, admission, iterations and token-level ends;
- ``text``: incremental detokenization, stop strings and hold-back, off the scheduler
  thread;
- ``metrics``: the Prometheus metrics;
- ``app``: the FastAPI routes and :func:`build_server`;
- ``cli``: the command line.

docs/serving.md describes the design.
"""

from infer.serve.app import Server, build_server, create_app

__all__ = ["Server", "build_server", "create_app"]
