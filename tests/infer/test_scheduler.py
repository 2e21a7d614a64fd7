"""The server's scheduler (:class:`infer.serve.scheduler.Scheduler`) on a tiny random model
(CPU): the order in which one admission round is prefilled, and the first runs of
programs while it is idle."""

from __future__ import annotations

import asyncio
import time

import pytest

pytest.importorskip("prometheus_client")

from infer.engine import Generator  # noqa: E402
from infer.serve.metrics import Metrics  # noqa: E402
from infer.serve.scheduler import Job, Scheduler  # noqa: E402
from infer.slots import SlotEngine, SlotParams  # noqa: E402
from tests.hf_reference import hf_model, to_orthrus  # noqa: E402


@pytest.mark.parametrize("prefill_rows", [1, 2])
def test_a_round_is_prefilled_shortest_first_and_answers_as_alone(prefill_rows):
    gen = Generator(to_orthrus(hf_model("qwen3", False, seed=0), block_size=8), max_len=64)
    engine = SlotEngine(gen, slots=4, mode="orthrus", block_size=4, eos_ids=[],
                        prefill_rows=prefill_rows, prefix_blocks=8, prefix_block_tokens=16)
    inserted: list[list[int]] = []  # prompt lengths of each insert, in call order
    insert_many = engine.insert_many

    def recording(requests, owners=None):
        inserted.append([len(ids) for _, ids, _ in requests])
        return insert_many(requests, owners)

    engine.insert_many = recording
    # the 40-token prompt's first 32 tokens are in the prefix store: it prefills 8
    cached = list(range(3, 43))
    engine.insert(0, cached, SlotParams(1))
    engine.free(0)
    inserted.clear()

    loop = asyncio.new_event_loop()
    prompts = [list(range(5, 35)), list(range(7, 12)), list(range(9, 26)), cached]
    jobs = [Job(prompt_ids=p, params=SlotParams(3), deadline=time.monotonic() + 120, loop=loop,
                events=asyncio.Queue()) for p in prompts]
    scheduler = Scheduler(engine, queue_size=8, metrics=Metrics())
    for job in jobs:  # queued before the thread starts: one admission round
        scheduler.submit(job)
    scheduler.start()
    limit = time.monotonic() + 120
    while any(job.tokens < 3 for job in jobs) and time.monotonic() < limit:
        time.sleep(0.05)
    scheduler.stop()
    loop.run_until_complete(asyncio.sleep(0))  # the events the thread sent
    outputs = []
    for job in jobs:
        ids = []
        while not job.events.empty():
            kind, *rest = job.events.get_nowait()
            assert kind == "tokens"
            ids += rest[0]
        outputs.append(ids)
    loop.close()

    # submitted 30, 5, 17, 40 tokens; prefilled by the tokens past the cached prefix: 5,
    # then 8 (40 less 32 cached), 17, 30
    assert inserted == ([[5], [40], [17], [30]] if prefill_rows == 1 else [[5, 40], [17, 30]])
    firsts = [job.first_at for job in jobs]
    assert firsts[1] <= firsts[3] <= firsts[2] <= firsts[0]
    for job, prompt, ids in zip(jobs, prompts, outputs, strict=True):
        assert job.tokens == 3
        assert ids == gen.generate([prompt], max_new_tokens=3, eos_ids=[])[0].token_ids


def test_an_idle_scheduler_runs_each_program_once_and_then_answers_as_alone():
    gen = Generator(to_orthrus(hf_model("qwen3", False, seed=0), block_size=8), max_len=64)
    engine = SlotEngine(gen, slots=4, mode="orthrus", block_size=4, eos_ids=[],
                        prefix_blocks=8, prefix_block_tokens=16)
    engine.warm_up()
    todo = engine.warm_runs()
    assert todo[:3] == [("step", 1), ("step", 2), ("step", 4)] and todo[-1] == ("store",)
    scheduler = Scheduler(engine, queue_size=8, metrics=Metrics(), warm_runs=True)
    assert scheduler.warm_runs_left == len(todo)
    scheduler.start()
    limit = time.monotonic() + 120
    while scheduler.warm_runs_left and time.monotonic() < limit:
        time.sleep(0.05)
    assert scheduler.warm_runs_left == 0 and engine.warm_runs() == []
    assert engine.exercise_seconds > 0 and engine.free_slots() == [0, 1, 2, 3]
    assert len(engine.prefix) == 0 and not engine.inserted and not engine.rows_stepped
    loop = asyncio.new_event_loop()
    prompt = list(range(5, 35))
    job = Job(prompt_ids=prompt, params=SlotParams(5), deadline=time.monotonic() + 120,
              loop=loop, events=asyncio.Queue())
    scheduler.submit(job)
    while job.tokens < 5 and time.monotonic() < limit:
        time.sleep(0.05)
    scheduler.stop()
    loop.run_until_complete(asyncio.sleep(0))
    ids = []
    while not job.events.empty():
        kind, *rest = job.events.get_nowait()
        ids += rest[0]
    loop.close()
    assert ids == gen.generate([prompt], max_new_tokens=5, eos_ids=[])[0].token_ids
