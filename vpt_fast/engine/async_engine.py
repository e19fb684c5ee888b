"""The engine loop in a background thread, for servers: submit, stream and abort from any
thread or asyncio task.

    engine = AsyncEngine(vpt_fast.from_pretrained(path))
    handle = engine.submit("photo.jpg", "<image>\\nWhat is written on the sign?")
    handle.result()                               # blocking, from any thread
    async for event in engine.stream_request(image, prompt, SamplingParams(max_new_tokens=32)):
        ...                                       # from asyncio; leaving the loop aborts the request
    engine.shutdown()

A request is loaded and encoded in the submitting thread (so images decode in parallel),
then handed to the loop, which runs `Engine.step()` while anything is in flight and
sleeps otherwise. Every request's events go to its `RequestHandle`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import AsyncIterator, Iterator

from ..sampling import SamplingParams
from .scheduler import Engine
from .state import Event, FinishEvent, GenerationResult, Request

logger = logging.getLogger("vpt_fast.engine")


class QueueFull(RuntimeError):
    """The waiting queue is at its bound: retry later."""


class EngineClosed(RuntimeError):
    """The engine is shutting down or shut down: it takes no new requests."""


class RequestRejected(ValueError):
    """A request that failed its checks (unusable image or prompt, a prompt longer than the
    engine takes), refused at submission with strict=True; `reason` is its finish reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _last(event: Event) -> bool:
    """Whether an event is a request's last (its last answer's FinishEvent)."""
    return isinstance(event, FinishEvent) and event.final


class RequestHandle:
    """One submitted request: iterate its events (in a thread or with `async for`), wait for
    its result, or abort it."""

    def __init__(self, owner: "AsyncEngine", request_id: int, params: SamplingParams | None = None):
        self.id = request_id
        self.params = params if params is not None else SamplingParams()  # how it generates
        self._owner = owner
        self._events: list[Event] = []
        self._cond = threading.Condition()
        self._watchers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._result: GenerationResult | None = None
        self._results: dict[int, GenerationResult] = {}  # by answer index

    @property
    def finished(self) -> bool:
        return self._result is not None

    def _push(self, event: Event) -> None:
        with self._cond:
            self._events.append(event)
            if isinstance(event, FinishEvent):
                self._results[event.index] = event.result
                if event.final:
                    self._result = self._results.get(0, event.result)
            self._cond.notify_all()
            watchers = list(self._watchers)
        for loop, ready in watchers:
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # that event loop is closed: nobody listens there any more
                pass

    def __iter__(self) -> Iterator[Event]:
        seen = 0
        while True:
            with self._cond:
                while seen == len(self._events):
                    self._cond.wait()
                new = self._events[seen:]
            seen += len(new)
            yield from new
            if _last(new[-1]):
                return

    async def __aiter__(self) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        with self._cond:
            self._watchers.append((loop, ready))
        try:
            seen = 0
            while True:
                ready.clear()
                with self._cond:
                    new = self._events[seen:]
                seen += len(new)
                for event in new:
                    yield event
                if new and _last(new[-1]):
                    return
                if not new:
                    await ready.wait()
        finally:
            with self._cond:
                self._watchers.remove((loop, ready))

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the request to finish (all its answers); its result (answer 0's; `results`
        has them all); TimeoutError after `timeout` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._result is not None, timeout):
                raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
            return self._result

    @property
    def results(self) -> list[GenerationResult]:
        """The answers finished so far, by index (all n once the request is finished)."""
        with self._cond:
            return [self._results[k] for k in sorted(self._results)]

    async def wait(self) -> GenerationResult:
        """The result, awaited."""
        async for _ in self:
            pass
        return self._result

    def abort(self) -> bool:
        return self._owner.abort(self.id)


class AsyncEngine:
    """An `Engine` driven by a background thread; thread-safe and asyncio-friendly.

    max_queue bounds the requests submitted but not yet running: `submit` raises `QueueFull`
    beyond it. `shutdown()` stops taking requests and finishes (or, with abort=True, aborts)
    what is in flight.
    """

    def __init__(self, engine: Engine, max_queue: int = 1024):
        if not isinstance(engine, Engine):
            raise TypeError(f"AsyncEngine drives an Engine, got {type(engine).__name__}")
        if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 1:
            raise ValueError(f"max_queue must be a positive int, got {max_queue!r}")
        self.engine = engine
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._inbox: list[Request] = []
        self._aborts: list[int] = []
        self._handles: dict[int, RequestHandle] = {}
        self._waiting = 0  # the engine's waiting count after its last step
        self._closing = False
        self._stopped = False  # the loop has returned
        self._thread = threading.Thread(target=self._loop, name="vpt_fast-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ front

    def submit(self, image, prompt, params: SamplingParams | None = None, forced_tokens=None, *,
               strict: bool = False) -> RequestHandle:
        """Queue a request (image: a path, a PIL image, a list of them (one per `<image>` of the
        prompt) or None; prompt: a str or a `prompt.Conversation`); returns its handle. Raises QueueFull when the waiting queue is
        at its bound, EngineClosed after shutdown, TypeError for params that are not
        SamplingParams. An unusable image or prompt finishes the request with reason "error",
        or, with strict=True, raises RequestRejected before anything is queued."""
        self.engine.check_alive()
        if self._closing:
            raise EngineClosed("the engine is shutting down: it takes no new requests")
        with self._cond:
            if len(self._inbox) + self._waiting >= self.max_queue:
                raise QueueFull(f"the waiting queue is full ({self.max_queue} requests): retry later")
        request = self.engine.prepare(image, prompt, params, forced_tokens)
        if strict and request.finished:
            raise RequestRejected(request.finish_reason, request.error)
        handle = RequestHandle(self, request.id, request.params)
        with self._cond:
            self.engine.check_alive()
            if self._closing:
                raise EngineClosed("the engine is shutting down: it takes no new requests")
            if len(self._inbox) + self._waiting >= self.max_queue:
                raise QueueFull(f"the waiting queue is full ({self.max_queue} requests): retry later")
            self._handles[request.id] = handle
            self._inbox.append(request)
            self._cond.notify_all()
        return handle

    def generate(self, image, prompt: str, params: SamplingParams | None = None, forced_tokens=None,
                 timeout: float | None = None) -> GenerationResult:
        """Submit one request and wait for its result."""
        return self.submit(image, prompt, params, forced_tokens).result(timeout)

    async def stream_request(self, image, prompt: str, params: SamplingParams | None = None,
                             forced_tokens=None) -> AsyncIterator[Event]:
        """Submit a request and yield its events; leaving early (a closed stream, a cancelled
        task, a client gone) aborts it."""
        handle = self.submit(image, prompt, params, forced_tokens)
        try:
            async for event in handle:
                yield event
        finally:
            if not handle.finished:
                self.abort(handle.id)

    def abort(self, request_id: int) -> bool:
        """Abort a request in flight (it finishes with reason "abort"); False when it is not."""
        with self._cond:
            handle = self._handles.get(request_id)
            if handle is None or handle.finished:
                return False
            self._aborts.append(request_id)
            self._cond.notify_all()
        return True

    @property
    def num_in_flight(self) -> int:
        with self._cond:
            return len(self._handles)

    def queue_depth(self) -> int:
        """Requests submitted and not yet running."""
        with self._cond:
            return len(self._inbox) + self._waiting

    @property
    def accepting(self) -> bool:
        """Whether `submit` takes requests (the loop runs, no shutdown has begun, the engine lives)."""
        return not self._closing and self._thread.is_alive() and self.engine.dead is None

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is in flight (every request submitted has finished and its handle
        has its result), `timeout` seconds at most; whether that happened."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._handles and not self._inbox, timeout)

    @property
    def dead(self) -> str | None:
        """Why the engine cannot serve any more (a device failure), or None while it can."""
        return self.engine.dead

    def wait_dead(self, timeout: float | None = None) -> str | None:
        """Block until the engine dies or the loop stops (`timeout` seconds at most); the reason,
        or None. A server's supervisor thread waits here to exit the process."""
        with self._cond:
            self._cond.wait_for(lambda: self.engine.dead is not None or self._stopped, timeout)
            return self.engine.dead

    def shutdown(self, abort: bool = False, timeout: float | None = None) -> None:
        """Stop taking requests; let those in flight finish (or abort them with abort=True, or
        once `timeout` seconds have passed), then stop the loop thread."""
        with self._cond:
            self._closing = True
            if abort:
                self._aborts.extend(self._handles)
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cond:
                self._aborts.extend(self._handles)
                self._cond.notify_all()
            self._thread.join()

    def __enter__(self) -> "AsyncEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ loop

    def _loop(self) -> None:
        try:
            self._serve()
        finally:
            with self._cond:
                self._stopped = True
                self._cond.notify_all()

    def _serve(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not (self._inbox or self._aborts or engine.has_unfinished() or self._closing
                           or engine.dead is not None):
                    self._cond.wait()
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
                self._waiting += len(inbox)  # in transit to the engine's queue: still counted against max_queue
                if engine.dead is not None:  # nothing will run again: end whatever is still queued
                    self._closing = True
                    self._cond.notify_all()
                    lost = [r.id for r in inbox] + list(self._handles)
                    events = [FinishEvent(rid, GenerationResult([], [], [], "", "error", error=f"engine failure: "
                                                                f"{engine.dead}")) for rid in dict.fromkeys(lost)]
                    handles, self._handles = self._handles, {}
                    for event in events:
                        handle = handles.get(event.request)
                        if handle is not None and not handle.finished:
                            handle._push(event)
                    return
                if self._closing and not inbox and not engine.has_unfinished() and not self._handles:
                    return
            self._turn(inbox, aborts)
            del inbox, aborts  # nothing of a finished request outlives its turn

    def _turn(self, inbox: list[Request], aborts: list[int]) -> None:
        """Hand the new requests and aborts to the engine, run one step, deliver its events."""
        engine = self.engine
        try:
            for request in inbox:
                engine.add_prepared(request)
            for request_id in aborts:
                engine.abort(request_id)
            events = engine.step() if engine.has_unfinished() else []
            waiting = engine.num_waiting
        except Exception as e:  # outside a step (which ends its own requests): end everything, go on
            logger.exception("vpt_fast engine loop failed")
            lost = engine.clear()
            events = [FinishEvent(rid, GenerationResult([], [], [], "", "error", error=f"engine failure: {e}"))
                      for rid in lost]
            waiting = 0
        with self._cond:
            self._waiting = waiting
            handles = dict(self._handles)
        for event in events:
            handle = handles.get(event.request)
            if handle is not None:
                handle._push(event)
        finished = [event.request for event in events if _last(event)]
        if finished:
            with self._cond:
                for request_id in finished:
                    self._handles.pop(request_id, None)
                self._cond.notify_all()  # wait_idle
        if engine.dead is not None:
            logger.error("vpt_fast engine is dead: %s", engine.dead)
            with self._cond:
                self._cond.notify_all()  # the loop's next turn ends what is left
