"""The scheduler: one thread owns the :class:`~infer.slots.SlotEngine` and makes every JAX
call. It admits queued requests into the lowest free slots (``--prefill-rows`` prompts
per program; a long prompt first prefilled a chunk per iteration, its slot kept for it),
runs the compiled decode loop one iteration at a time over the busy slots,
and hands each request its new token ids; requests end at EOS, at their budget, at their
deadline, when their client goes away, or when their handler met a stop string. With
``warm_runs``, whenever nothing waits and no slot is busy it runs one program not yet
run once (:meth:`SlotEngine.exercise_one`), so later requests find it prepared.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
import traceback
from typing import Any

from infer.serve.metrics import Metrics
from infer.serve.protocol import RequestError, deadline_error
from infer.slots import SlotEngine, SlotParams

log = logging.getLogger("infer.serve")

# the engine's finish reasons as OpenAI names them
FINISH_TO_OPENAI = {"eos": "stop", "length": "length", "cache_full": "length"}


@dataclasses.dataclass(eq=False)
class Job:
    """One request between its handler and the scheduler. ``events`` receives
    ``("tokens", new_ids, finish)`` after each iteration that gave the request tokens or
    ended it (``finish``: the OpenAI finish reason at its end, else None), or
    ``("error", RequestError)``. The handler makes text of the tokens
    (:mod:`infer.serve.text`) and ends the request at a stop string with
    :meth:`Scheduler.finish`."""

    prompt_ids: list[int]
    params: SlotParams
    deadline: float  # time.monotonic() limit
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    created: float = dataclasses.field(default_factory=time.monotonic)
    cancelled: bool = False  # the client went away
    finished: bool = False  # the handler ended it (a stop string)
    tokens: int = 0  # generated so far
    first_at: float | None = None

    def send(self, *event: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Scheduler:
    """The thread that owns ``engine`` (every JAX call): queues, admission, iterations,
    token-level ends (EOS, budget, deadline, disconnect, :meth:`finish`)."""

    def __init__(self, engine: SlotEngine, *, queue_size: int, metrics: Metrics,
                 warm_runs: bool = False):
        self.engine, self.queue_size, self.metrics = engine, queue_size, metrics
        # programs not yet run once (SlotEngine.warm_runs), run while nothing else waits
        self.warm_runs_left = len(engine.warm_runs()) if warm_runs else 0
        self._pending: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        # slots kept for long prompts prefilling chunk by chunk, first come first; what
        # each slot holds (its job) is the engine's record (SlotEngine.records)
        self._staging: collections.deque[int] = collections.deque()
        self._closing = False
        self._closing_requested = False  # draining: no new requests
        self.broken: str | None = None
        self._prefix_seen = (0, 0)  # prefix-cache queries and hits already counted
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._show_plan()

    def _show_plan(self) -> None:
        """The block size and tree budget of the latest step (before any: one row's)."""
        self.metrics.block_size.set(self.engine.block)
        self.metrics.tree_budget.set(self.engine.tree_budget)

    def start(self) -> None:
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def busy(self) -> int:
        """Requests holding a slot (decoding, or prefilling a long prompt in chunks)."""
        return sum(not r.free for r in self.engine.records)

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

    def finish(self, job: Job) -> None:
        """The answer is complete (its handler met a stop string): free its slot at the
        next iteration, counted as answered."""
        with self._cv:
            job.finished = True
            self._cv.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread and fail whatever is still queued or decoding (503)."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout)
        err = RequestError("the server shut down before this request finished", status=503,
                           type_="server_error", code="shutdown")
        for job in self._all_jobs():
            self._fail(job, err, "shutdown")
        self._forget_all()

    def _all_jobs(self) -> list[Job]:
        return [*self._pending, *(r.owner for r in self.engine.records if not r.free)]

    def _job(self, slot: int) -> Job:
        return self.engine.records[slot].owner

    def _forget_all(self) -> None:
        self._pending.clear()
        self._staging.clear()
        self.engine.forget_all()  # the device may be gone: nothing runs on it here

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._closing or self._pending or self.busy
                               or self.warm_runs_left):
                        self._cv.wait()
                    if self._closing:
                        return
                    idle = not (self._pending or self.busy)
                if idle:  # nothing to serve: one program's first run, then look again
                    self.engine.exercise_one()
                    self.warm_runs_left = len(self.engine.warm_runs())
                    continue
                with self._cv:
                    free = self.engine.free_slots()
                    admit = [self._pending.popleft() for _ in range(min(len(free),
                                                                        len(self._pending)))]
                    self.metrics.queue.set(len(self._pending))
                self._admit_many(list(zip(free, admit, strict=False)))
                self._prefill_chunk()
                if any(self.engine.busy):
                    for u in self.engine.step(1):
                        self.metrics.tokens_per_iteration.observe(len(u.new_ids))
                        self._update(self._job(u.slot), u.slot, u.new_ids, u.finish_reason)
                    self._show_plan()
                self._sweep()
                self._count_prefix()
        except Exception as e:  # noqa: BLE001 (a failed device call: fail every request)
            self.broken = f"{type(e).__name__}: {e}"
            log.error("scheduler failed:\n%s", traceback.format_exc())
            err = RequestError(f"internal error: {self.broken}", status=500,
                               type_="server_error")
            with self._cv:
                for job in self._all_jobs():
                    self._fail(job, err, "error")
                self._forget_all()

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
        live = []
        for slot, job in pairs:
            if not self._admissible(job):
                continue
            if self.engine.needs_chunks(job.prompt_ids):
                self.engine.keep(slot, job)  # prefilled a chunk per iteration first
                self._staging.append(slot)
            else:
                live.append((slot, job))
        # Shortest prefill first: every job of the round is prefilled before the next
        # step, and this order gives the round's first tokens soonest (the least mean
        # wait) and groups prompts of one bucket together.
        live.sort(key=lambda pair: self.engine.uncached(pair[1].prompt_ids))
        n = self.engine.prefill_rows
        for i in range(0, len(live), n):
            self._admit(live[i:i + n])

    def _prefill_chunk(self) -> None:
        """One chunk of the first long prompt waiting (then the running slots take their
        step); once the rest fits one insert, the job is admitted into its kept slot."""
        if not self._staging:
            return
        slot = self._staging[0]
        job = self._job(slot)
        try:
            self.engine.prefill_next_chunk(job.prompt_ids)
        except ValueError as e:  # checked by Api.parse already; never a crash
            self._staging.popleft()
            self.engine.release(slot)
            self._fail(job, RequestError(str(e)), "bad_request")
            return
        if not self.engine.needs_chunks(job.prompt_ids):
            self._staging.popleft()
            self._admit([(slot, job)])

    def _admissible(self, job: Job) -> bool:
        """Whether ``job`` is still wanted (counted and answered here if not)."""
        if job.cancelled:
            self.metrics.requests.labels("cancelled").inc()
            return False
        if time.monotonic() > job.deadline:
            self._fail(job, deadline_error(), "timeout")
            return False
        return True

    def _admit(self, group: list[tuple[int, Job]]) -> None:
        """Prefill ``group`` together; if the engine refuses one of several, each is
        admitted alone, so only that one fails."""
        try:
            updates = self.engine.insert_many([(slot, job.prompt_ids, job.params)
                                               for slot, job in group],
                                              [job for _, job in group])
        except ValueError as e:  # checked by Api.parse already; never a crash
            if len(group) > 1:
                for one in group:
                    self._admit([one])
            else:
                slot, job = group[0]
                if not self.engine.records[slot].free:  # kept for its chunks
                    self.engine.release(slot)
                self._fail(job, RequestError(str(e)), "bad_request")
            return
        for (slot, job), u in zip(group, updates, strict=True):
            self.metrics.busy.set(sum(self.engine.busy))
            self._update(job, slot, u.new_ids, u.finish_reason)

    def _sweep(self) -> None:
        now = time.monotonic()
        for slot in list(self._staging):
            job = self._job(slot)
            if job.cancelled or now > job.deadline:
                self._staging.remove(slot)
                self.engine.release(slot)
                self.engine.forget_chunks(job.prompt_ids)
                self._admissible(job)  # counts and answers it
        for slot, job in self.engine.owners().items():
            if job.finished:
                self._end(slot, job, now)
            elif job.cancelled:
                self._release(slot)
                self.metrics.requests.labels("cancelled").inc()
            elif now > job.deadline:
                self._release(slot)
                self._fail(job, deadline_error(), "timeout")

    def _release(self, slot: int) -> None:
        self.engine.free(slot)
        self.metrics.busy.set(sum(self.engine.busy))

    def _fail(self, job: Job, err: RequestError, outcome: str) -> None:
        self.metrics.requests.labels(outcome).inc()
        job.send("error", err)

    def _update(self, job: Job, slot: int, new_ids: list[int], finish: str | None) -> None:
        """Hand ``job`` its new tokens; at EOS or its budget, end it and free its slot."""
        now = time.monotonic()
        if new_ids and job.first_at is None:
            job.first_at = now
            self.metrics.ttft.observe(now - job.created)
        job.tokens += len(new_ids)
        self.metrics.tokens.inc(len(new_ids))
        reason = None if finish is None else FINISH_TO_OPENAI[finish]
        if new_ids or reason:
            job.send("tokens", new_ids, reason)
        if reason is not None:
            self._end(slot, job, now)

    def _end(self, slot: int, job: Job, now: float) -> None:
        """``job`` is answered: free its slot and count it."""
        self._release(slot)
        if job.tokens > 1:
            self.metrics.tpot.observe((now - job.first_at) / (job.tokens - 1))
        self.metrics.requests.labels("ok").inc()
