"""Failures inside a step: a one-off ends only the requests in flight; a device error, or two
failed steps in a row, marks the engine dead (AsyncEngine refuses requests, /health answers 503,
`vpt-fast serve` exits 1). Failures are injected into the decode step."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import httpx
import pytest
import torch
from vpt_cases import rand_image

from vpt_fast import SamplingParams
from vpt_fast.engine import AsyncEngine, Engine, EngineDead, FinishEvent

PARAMS = SamplingParams(max_new_tokens=6)
CUDA_ERROR = torch.AcceleratorError("CUDA error: an illegal memory access was encountered")


class Failing:
    """Wraps a part of an engine's step (its decode step, its prefill): raises `error` on the calls numbered in `when` (from 1)."""

    def __init__(self, step, error: Exception, when):
        self.step, self.error, self.when, self.calls = step, error, when, 0

    def __call__(self, *args):
        self.calls += 1
        if self.calls in self.when:
            raise self.error
        return self.step(*args)


def drive(engine: Engine, limit: int = 200) -> dict[int, object]:
    """Step until nothing is left; the results by request id."""
    results = {}
    for _ in range(limit):
        if not engine.has_unfinished():
            return results
        for event in engine.step():
            if isinstance(event, FinishEvent):
                results[event.request] = event.result
    raise AssertionError("the engine never finished its requests")


def ask(engine: Engine, n: int, seed: int = 0) -> list[int]:
    return [engine.add_request(rand_image(40, 40, seed + i), f"Question {i}?", PARAMS) for i in range(n)]


def test_a_one_off_failure_ends_the_running_requests_only(tiny_bundle):
    engine = Engine(tiny_bundle("region"), max_batch_size=2)
    alone = Engine(tiny_bundle("region"))
    engine._decoder = Failing(engine._decoder, RuntimeError("a bad step"), when={2})
    running, waiting = ask(engine, 2), ask(engine, 1, seed=5)
    results = drive(engine)
    for rid in running:
        assert results[rid].finish_reason == "error"
        assert results[rid].error == "engine failure: RuntimeError: a bad step"
    # the request that was still waiting runs afterwards, as it would alone
    (later,) = waiting
    (ref,) = [alone.add_request(rand_image(40, 40, 5), "Question 0?", PARAMS)]
    assert results[later].token_ids == drive(alone)[ref].token_ids
    assert engine.dead is None and engine.kv_blocks_used == 0
    rid = engine.add_request(None, "Again?", PARAMS)
    assert drive(engine)[rid].finish_reason in ("stop", "length")


def test_two_failed_steps_in_a_row_kill_the_engine(tiny_bundle):
    engine = Engine(tiny_bundle("region"), max_batch_size=1)
    engine._decoder = Failing(engine._decoder, RuntimeError("keeps failing"), when=set(range(1, 100)))
    first, second = ask(engine, 2)
    results = drive(engine)
    assert results[first].finish_reason == results[second].finish_reason == "error"
    assert "engine failure: RuntimeError: keeps failing" in results[second].error
    assert engine.dead == "2 steps in a row failed, the last with RuntimeError: keeps failing"
    assert not engine.has_unfinished() and engine.kv_blocks_used == 0
    with pytest.raises(EngineDead, match="the engine is dead and takes no requests: 2 steps in a row failed"):
        engine.add_request(None, "Hello?", PARAMS)
    with pytest.raises(EngineDead):
        engine.generate([None], ["Hello?"])


def test_a_device_error_kills_the_engine_at_once(tiny_bundle):
    engine = Engine(tiny_bundle("region"), max_batch_size=1)
    engine._decoder = Failing(engine._decoder, CUDA_ERROR, when={1})
    ids = ask(engine, 3)
    results = drive(engine)
    assert [results[i].finish_reason for i in ids] == ["error"] * 3  # the waiting ones too: nothing will run
    assert engine.dead.startswith("device failure (AcceleratorError: CUDA error: an illegal memory access")
    assert engine.step() == []


def test_an_out_of_memory_error_is_not_a_dead_device(tiny_bundle):
    engine = Engine(tiny_bundle("region"))
    engine._decoder = Failing(engine._decoder, torch.cuda.OutOfMemoryError("CUDA out of memory."), when={1})
    (rid,) = ask(engine, 1)
    assert drive(engine)[rid].finish_reason == "error"
    assert engine.dead is None


def test_async_engine_refuses_requests_once_dead(tiny_bundle):
    core = Engine(tiny_bundle("region"), max_batch_size=1)
    core._decoder = Failing(core._decoder, CUDA_ERROR, when={1})
    engine = AsyncEngine(core)
    try:
        handles = [engine.submit(rand_image(40, 40, i), "Question?", PARAMS) for i in range(3)]
        for h in handles:
            result = h.result(timeout=60)
            assert result.finish_reason == "error" and "CUDA error" in result.error
        assert engine.wait_dead(timeout=10).startswith("device failure")
        assert not engine.accepting
        with pytest.raises(EngineDead, match="device failure"):
            engine.submit(None, "Anyone?", PARAMS)
    finally:
        engine.shutdown(timeout=10)


def test_health_answers_503_with_the_reason(tiny_bundle):
    from vpt_fast.serving.app import ServeConfig, build_app

    core = Engine(tiny_bundle("region"))
    core._segments.run = Failing(core._segments.run, CUDA_ERROR, when={1})  # the prefill: every request has one
    engine = AsyncEngine(core)
    app = build_app(engine, ServeConfig(model_name="tiny"), shutdown_timeout=None)
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
            before = await http.get("/health")
            failed = await http.post("/v1/chat/completions", json=body)
            after = await http.get("/health")
            refused = await http.post("/v1/chat/completions", json=body)
            return before, failed, after, refused

    try:
        before, failed, after, refused = asyncio.run(scenario())
    finally:
        engine.shutdown(timeout=10)
    assert before.status_code == 200
    assert failed.status_code == 500 and "CUDA error" in failed.json()["error"]["message"]
    assert after.status_code == 503 and after.json()["error"]["message"].startswith("the engine is dead: device failure")
    assert refused.status_code == 503 and "the engine is dead" in refused.json()["error"]["message"]


def test_serve_exits_1_when_the_engine_dies(tiny_bundle, monkeypatch):
    from vpt_fast.serving import server
    from vpt_fast.serving.app import ServeConfig, build_app

    core = Engine(tiny_bundle("region"))
    core._segments.run = Failing(core._segments.run, CUDA_ERROR, when={1})
    engine = AsyncEngine(core)
    monkeypatch.setattr(server, "make_app", lambda args: build_app(engine, ServeConfig(), shutdown_timeout=5))
    killer = threading.Timer(1.0, lambda: engine.submit(None, "Hi", PARAMS))
    killer.start()
    try:
        args = SimpleNamespace(host="127.0.0.1", port=0, max_connections=8, header_timeout=5.0)
        assert server.serve(args) == 1
    finally:
        killer.cancel()
        engine.shutdown(timeout=10)


class PoisonRow:
    """Wraps an engine's decode step: on call `when`, the logits of the row of `token` become NaN
    (one request's numbers going bad, as an overflow would make them)."""

    def __init__(self, step, when: int, row: int):
        self.step, self.when, self.row, self.calls = step, when, row, 0

    def __call__(self, *args):
        logits, hidden = self.step(*args)
        self.calls += 1
        if self.calls == self.when:
            logits[self.row] = float("nan")
        return logits, hidden


@pytest.mark.parametrize("sampled", [False, True])
def test_non_finite_logits_end_that_request_alone(tiny_bundle, sampled):
    params = SamplingParams(max_new_tokens=6, do_sample=sampled, temperature=0.8, seed=3)
    images = [rand_image(40, 40, i) for i in range(3)]
    alone = Engine(tiny_bundle("region")).generate(images, ["Q?"] * 3, max_new_tokens=6, do_sample=sampled,
                                                   temperature=0.8, seed=3)
    engine = Engine(tiny_bundle("region"))
    engine._decoder = PoisonRow(engine._decoder, when=2, row=1)
    ids = [engine.add_request(image, "Q?", params) for image in images]
    results = drive(engine)
    bad = results[ids[1]]
    assert bad.finish_reason == "error"
    assert bad.error == f"request {ids[1]}: the model's logits hold NaN or infinite values; the request cannot go on"
    for i in (0, 2):
        assert results[ids[i]].token_ids == alone[i].token_ids  # the others as if nothing happened
    assert engine.dead is None and engine.kv_blocks_used == 0


def test_a_tiny_temperature_is_raised_as_vllm_does():
    with pytest.warns(UserWarning, match=r"temperature 1e-300 is below 0.01: raised to 0.01"):
        params = SamplingParams(do_sample=True, temperature=1e-300)
    assert params.temperature == 0.01
    for seed in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match="seed must be an int in"):
            SamplingParams(seed=seed)
