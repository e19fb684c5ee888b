"""The async front: many threads and asyncio tasks at once, queue bound, abort, shutdown, a
failing step, and a soak of many requests (memory and blocks come back)."""

import asyncio
import gc
import threading
import tracemalloc
import weakref

import pytest
from vpt_cases import action, assert_same_result, rand_image, region, toks

from vpt_fast import SamplingParams
from vpt_fast.engine import AsyncEngine, Engine, EngineClosed, FinishEvent, PerceptionEvent, QueueFull, TokenEvent

PARAMS = SamplingParams(max_new_tokens=8, return_logits=True)


def cases(bundle, n):
    tok = bundle.tokenizer
    scripts = [region(([2, 4], [5, 6])), action("clip"), None, "Plain<|im_end|>", region(([1], [1]), ([6], [6]))]
    return [(rand_image(40 + 7 * (i % 9), 50 + 5 * (i % 4), i), f"Question {i % 5}?", PARAMS,
             toks(tok, scripts[i % len(scripts)]) if scripts[i % len(scripts)] else None) for i in range(n)]


@pytest.fixture(scope="module")
def clip(tiny_bundle):
    return tiny_bundle("clip")


@pytest.fixture(scope="module")
def expected(clip):
    """Alone results of 16 requests, each run by itself."""
    out = []
    for request in cases(clip, 16):
        engine = Engine(clip)
        rid = engine.add_request(*request)
        while engine.has_unfinished():
            for event in engine.step():
                if isinstance(event, FinishEvent) and event.request == rid:
                    out.append(event.result)
    return out


def test_eight_threads_submitting_at_once(clip, expected):
    requests = cases(clip, 16)
    with AsyncEngine(Engine(clip, max_batch_size=6)) as engine:
        results = [None] * 16
        start = threading.Barrier(8)

        def worker(k):
            start.wait()
            handles = [(i, engine.submit(*requests[i])) for i in range(k, 16, 8)]
            for i, handle in handles:
                results[i] = handle.result(timeout=120)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i, (got, want) in enumerate(zip(results, expected)):
        assert_same_result(got, want, what=f"request {i}")
    assert engine.engine.kv_blocks_used == 0


def test_sixteen_asyncio_tasks_streaming(clip, expected):
    requests = cases(clip, 16)
    engine = AsyncEngine(Engine(clip))

    async def one(i):
        events = [event async for event in engine.stream_request(*requests[i])]
        return events

    async def main():
        return await asyncio.gather(*(one(i) for i in range(16)))

    try:
        streams = asyncio.run(main())
    finally:
        engine.shutdown()
    for i, events in enumerate(streams):
        assert isinstance(events[-1], FinishEvent) and all(e.request == events[-1].request for e in events)
        result = events[-1].result
        assert_same_result(result, expected[i], what=f"request {i}")
        assert [e.token_id for e in events if isinstance(e, TokenEvent)] == result.token_ids
        assert [e.trace for e in events if isinstance(e, PerceptionEvent)] == result.trace


def test_a_full_queue_refuses_and_the_rest_complete(clip, expected):
    requests = cases(clip, 5)
    engine = AsyncEngine(Engine(clip), max_queue=3)
    try:
        with engine.engine._one_call():  # the loop cannot step: submissions pile up
            handles = [engine.submit(*requests[i]) for i in range(3)]
            with pytest.raises(QueueFull, match=r"the waiting queue is full \(3 requests\): retry later"):
                engine.submit(*requests[3])
        for i, handle in enumerate(handles):
            assert_same_result(handle.result(timeout=120), expected[i])
        assert_same_result(engine.submit(*requests[3]).result(timeout=120), expected[3])  # room again
    finally:
        engine.shutdown()


def test_shutdown_finishes_what_is_in_flight_then_refuses(clip, expected):
    requests = cases(clip, 4)
    engine = AsyncEngine(Engine(clip))
    handles = [engine.submit(*r) for r in requests]
    engine.shutdown()
    for i, handle in enumerate(handles):
        assert_same_result(handle.result(timeout=0), expected[i])
    with pytest.raises(EngineClosed, match="shutting down"):
        engine.submit(*requests[0])
    assert not engine._thread.is_alive()


def test_shutdown_with_abort_and_a_handle_abort(clip, expected):
    requests = cases(clip, 4)
    slow = SamplingParams(max_new_tokens=64)
    engine = AsyncEngine(Engine(clip))
    first = engine.submit(requests[0][0], "Tell me a long story.", slow)
    next(iter(first))  # it is running
    assert first.abort() and first.result(timeout=60).finish_reason == "abort"
    assert not first.abort()
    kept = engine.submit(*requests[1])
    assert_same_result(kept.result(timeout=60), expected[1])
    many = [engine.submit(r[0], "Tell me a long story.", slow) for r in requests]
    engine.shutdown(abort=True)
    assert {h.result(timeout=0).finish_reason for h in many} <= {"abort", "length", "stop"}
    assert any(h.result().finish_reason == "abort" for h in many)
    assert engine.engine.kv_blocks_used == 0 and not engine.engine.has_unfinished()


def test_leaving_a_stream_aborts_its_request(clip):
    engine = AsyncEngine(Engine(clip))

    async def leave_early():
        async for event in engine.stream_request(rand_image(60, 60), "Tell me a long story.",
                                                 SamplingParams(max_new_tokens=200)):
            if isinstance(event, TokenEvent):
                return event.request

    try:
        rid = asyncio.run(leave_early())
        assert engine.wait_idle(timeout=60)
        assert not engine.engine.has_unfinished() and engine.engine.kv_blocks_used == 0
        assert engine.num_in_flight == 0 and rid is not None
    finally:
        engine.shutdown()


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(clip, expected, monkeypatch):
    requests = cases(clip, 2)
    core = Engine(clip)
    engine = AsyncEngine(core)
    try:
        real = core._step
        calls = {"n": 0}

        def flaky():
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("device lost")
            return real()

        monkeypatch.setattr(core, "_step", flaky)
        doomed = engine.submit(*requests[0])
        result = doomed.result(timeout=60)
        assert result.finish_reason == "error" and result.error == "engine failure: device lost"
        assert core.kv_blocks_used == 0
        assert_same_result(engine.submit(*requests[1]).result(timeout=60), expected[1])
    finally:
        engine.shutdown()


def test_a_soak_of_a_thousand_requests(tiny_bundle, monkeypatch):
    """Nothing of a finished request stays behind: every request object and handle is collected,
    the engine's tables are empty, and the memory Python allocates does not grow with the
    requests served (tracemalloc, after a first round has settled caches)."""
    b = tiny_bundle("region")
    tok = b.tokenizer
    forced = toks(tok, region(([1], [2])))
    images = [rand_image(28 + i % 5, 28, i) for i in range(10)]
    params = SamplingParams(max_new_tokens=3)
    core = Engine(b, kv_cache_tokens=4096, max_batch_size=32)
    made = []
    prepare = core.prepare
    monkeypatch.setattr(core, "prepare", lambda *a, **k: made.append(weakref.ref(r := prepare(*a, **k))) or r)
    engine = AsyncEngine(core, max_queue=2000)
    handles = []
    try:
        def run(first, count):
            batch = [engine.submit(images[i % 10], "Q?", params, forced if i % 3 == 0 else None)
                     for i in range(first, first + count)]
            for h in batch:
                assert h.result(timeout=300).finish_reason in ("stop", "length")
            handles.extend(weakref.ref(h) for h in batch)

        run(0, 100)
        gc.collect()
        tracemalloc.start()
        try:
            run(100, 300)  # what tracing holds from here on (interned names, small caches) settles
            gc.collect()
            settled = tracemalloc.take_snapshot()
            for start in range(400, 1000, 150):
                run(start, 150)
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        mine = [tracemalloc.Filter(False, __file__)]  # the weak references this test keeps
        grown = sum(stat.size_diff for stat in after.filter_traces(mine).compare_to(settled.filter_traces(mine),
                                                                                    "filename"))
        assert grown < 64 * 1024, f"{grown} bytes more held after 600 requests ({grown / 600:.0f} per request)"
        alive = [i for i, ref in enumerate(made) if ref() is not None]
        assert len(made) == 1000 and not alive, f"finished requests still referenced: {alive}"
        assert all(ref() is None for ref in handles), "request handles are still referenced"
        assert not core._requests and not core._running and not core._waiting and not core._done
        assert engine.engine.kv_blocks_used == 0 and engine.num_in_flight == 0
    finally:
        engine.shutdown()
