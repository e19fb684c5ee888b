"""The OpenAI-compatible HTTP app over an `AsyncEngine`.

Routes: POST /v1/chat/completions (streaming with SSE or not), GET /v1/models, GET /health,
GET /metrics (Prometheus text); with `ServeConfig.replica_id`, every response names its
replica in an `x-vpt-fast-replica` header. Errors are OpenAI-style JSON bodies: 400 for an unreadable
image, a bad message, more images than `limit_mm_per_prompt` or an out-of-range parameter, 401 for a wrong or missing key, 404 for
another model name, 413 for an image over the byte or pixel limit, 429 when the waiting
queue is full, 503 while shutting down or once the engine is dead (a device failure). A client that goes away aborts its request.

Streams carry the text as it is generated: for a VPT model, whatever it writes before
asking for a perception (usually nothing: its requests are special tokens) comes first, then
a chunk with the perception, then the answer. The non-streaming `content` is the engine's
answer (`GenerationResult.text`), the round-1 text being in `vpt.round1_text`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from ..chat import from_messages
from ..engine import AsyncEngine, EngineClosed, EngineDead, FinishEvent, PerceptionEvent, QueueFull, RequestRejected, TokenEvent
from ..media import MediaError, MediaPolicy
from ..prompt import script_ids
from ..sampling import SamplingParams
from .metrics import ServerMetrics
from ..engine.text import IncrementalText, find_stop
from .protocol import ChatCompletionRequest, Completion, LogprobWriter, error_json, shown_logprobs, trace_json, vpt_json

logger = logging.getLogger("vpt_fast.serving")


TEXT_ALLOWANCE = 2**20  # bytes of a request beyond its images: the text, the JSON around it


def default_max_request_bytes(media: MediaPolicy, images: int = 1) -> int:
    """The largest request worth reading: each image a request may carry at the byte limit, as
    base64 (4 bytes for 3) in a data: URL, plus TEXT_ALLOWANCE."""
    return images * (4 * -(-media.max_image_bytes // 3) + 64) + TEXT_ALLOWANCE


@dataclass(frozen=True)
class ServeConfig:
    model_name: str = "vpt-fast"
    api_key: str | None = None
    media: MediaPolicy = MediaPolicy()
    default_max_tokens: int = 256
    replica_id: str | None = None  # sent as the x-vpt-fast-replica header of every response (Ray Serve)
    max_request_bytes: int | None = None  # a body over it is refused (413) while it is read; None: the default
    protect_metrics: bool = False  # /metrics behind the API key too
    limit_mm_per_prompt: int = 8  # the most images one request may carry (vLLM's option); past it a 400

    @property
    def request_limit(self) -> int:
        return self.max_request_bytes or default_max_request_bytes(self.media)


class _TooLarge(Exception):
    pass


class _Gate:
    """The ASGI layer every request passes first, before anything reads its body: the API key
    from the headers (401 for the /v1 routes, and /metrics when protected, with nothing about
    the request), then the size (413 for a Content-Length over the limit, and for a body that
    grows past it while it is read, whatever it declared)."""

    def __init__(self, app, config: ServeConfig):
        self.app = app
        self.key = None if config.api_key is None else f"Bearer {config.api_key}".encode()
        self.protected = ("/v1",) + (("/metrics",) if config.protect_metrics else ())
        self.limit = config.request_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for name, value in scope["headers"]:
            headers.setdefault(name, value)  # the first of repeated headers, as Starlette reads them
        path = scope["path"]
        if self.key is not None and any(path == p or path.startswith(p + "/") for p in self.protected):
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.key):
                return await _send_json(send, 401, "a valid API key is needed: Authorization: Bearer <key>")
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await _send_json(send, 400, "Content-Length must be a number of bytes")
            if int(declared) > self.limit:
                return await _send_json(send, 413, f"the request is over the limit of {self.limit} bytes")
        received, started = 0, False

        async def bounded_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, bounded_receive, tracked_send)
        except _TooLarge:
            if started:
                raise
            await _send_json(send, 413, f"the request is over the limit of {self.limit} bytes")


async def _send_json(send, status: int, message: str) -> None:
    """An error answered by the gate, closing the connection: the body the request declared is
    left unread, so the connection cannot carry another request."""
    body = json.dumps(error_json(message, status)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_json(message, status, param=param), status_code=status)


class _Decoder:
    """The streamed text of one answer: what its tokens add (special tokens left out), held back
    while a stop string may still begin in it, so that nothing sent is cut later; a round's
    held-back text goes out when the round ends, the answer's as its result has it."""

    def __init__(self, tokenizer, stops: tuple[str, ...], include: bool):
        self.tokenizer, self.stops, self.include = tokenizer, stops, include
        self.hold = max(map(len, stops), default=1) - 1
        self._new_round()

    def _new_round(self) -> None:
        self.text = IncrementalText(self.tokenizer)
        self.sent = 0

    def add(self, token_id: int) -> str:
        self.text.add(token_id)
        text = self.text.text
        # a stop string not yet whole at the last token begins at or after what was sent
        found = find_stop(text, self.stops, self.sent) if self.stops else None
        limit = len(text) - self.hold if found is None else found[0] + (len(found[1]) if self.include else 0)
        if limit <= self.sent:
            return ""
        delta, self.sent = text[self.sent : limit], limit
        return delta

    def next_round(self) -> str:
        """A perception ended the round (no stop string in it): the rest of its text."""
        self.text.rest()
        rest = self.text.text[self.sent :]
        self._new_round()
        return rest

    def finish(self, final_text: str) -> str:
        """The rest of the answer, as the result's text (its last round, cut at a stop string) has it."""
        self.text.rest()
        sent = self.text.text[: self.sent]
        return final_text[len(sent) :] if final_text.startswith(sent) else ""


def build_app(engine: AsyncEngine, config: ServeConfig = ServeConfig(), shutdown_timeout: float | None = 30.0) -> FastAPI:
    """The app; when the server stops, the engine finishes what is in flight (aborting what is
    left after `shutdown_timeout` seconds) unless shutdown_timeout is None."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if shutdown_timeout is not None:
            await run_in_threadpool(engine.shutdown, False, shutdown_timeout)

    app = FastAPI(title="vpt_fast", description="OpenAI-compatible chat completions with Visual Perception Tokens",
                  lifespan=lifespan)
    metrics = ServerMetrics(engine)
    tokenizer = engine.engine.bundle.tokenizer
    # text past this many characters cannot fit in max_seq_len tokens: no token spells more
    max_text_chars = engine.engine.max_seq_len * max(len(t) for t in tokenizer.get_vocab())
    app.add_middleware(_Gate, config=config)
    app.state.engine = engine
    app.state.metrics = metrics

    if config.replica_id is not None:
        @app.middleware("http")
        async def _replica_header(request: Request, call_next):
            response = await call_next(request)
            response.headers["x-vpt-fast-replica"] = config.replica_id
            return response

    @app.exception_handler(HTTPError)
    async def _http(request: Request, exc: HTTPError):
        return _error(exc.status, str(exc), exc.param)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        request_id = f"req-{uuid.uuid4().hex[:16]}"
        logger.error("%s: %s %s failed", request_id, request.method, request.url.path,
                     exc_info=(type(exc), exc, exc.__traceback__))
        return _error(500, f"internal error; the server's log has the details under {request_id}")

    @app.get("/health")
    async def health():
        if engine.dead is not None:
            return _error(503, f"the engine is dead: {engine.dead}")
        if not engine.accepting:
            return _error(503, "the server is shutting down")
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "vpt_fast"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrival = time.perf_counter()
        raw = await request.body()  # already bounded by the gate
        handle, body, notes = await admit(raw)
        completion = Completion(config.model_name)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(handle, completion, include_usage, arrival, notes),
                                     media_type="text/event-stream")
        return await respond(handle, completion, request, arrival, notes)

    def parse(raw: bytes) -> tuple[ChatCompletionRequest, Any, Any, SamplingParams, dict]:
        """The request checked, before any tokenizing: (body, images, conversation, params, notes)."""
        try:
            body = ChatCompletionRequest.model_validate_json(raw)
        except ValidationError as e:
            first = e.errors()[0] if e.errors() else {}
            where = ".".join(str(p) for p in first.get("loc", ()))
            what = first.get("msg", "invalid request").removeprefix("Value error, ")
            raise HTTPError(400, f"{where + ': ' if where else ''}{what}", where or None) from None
        if body.model is not None and body.model != config.model_name:
            raise HTTPError(404, f"the model {body.model[:100]!r} does not exist here: this server serves "
                                 f"{config.model_name!r}", "model")
        notes: dict[str, list[str]] = {}
        ignored = body.ignored_fields()
        if ignored:
            notes["ignored_fields"] = ignored
            logger.warning("request fields ignored: %s", ", ".join(ignored))
        try:
            params, warned = body.sampling_params(config.default_max_tokens)
            images, chat = from_messages(body.messages_as_dicts(), mode=body.vpt_mode,
                                         max_images=config.limit_mm_per_prompt)
        except (TypeError, ValueError) as e:
            raise HTTPError(400, str(e), "messages") from None
        if warned:
            notes["warnings"] = warned
        structured, field = body.structured()
        if structured is not None:
            try:
                engine.engine.grammars.compile(structured)  # kept by the compiler: preparing the request reuses it
            except ValueError as e:
                raise HTTPError(400, f"{field}: {e}", field) from None
        chars = sum(len(text) for _, text in chat.turns) + len(chat.system) + len(body.vpt_force or "")
        if chars > max_text_chars:
            raise HTTPError(400, f"the request holds {chars} characters of text, more than the {max_text_chars} this "
                                 f"server reads (max_seq_len {engine.engine.max_seq_len} tokens)", "messages")
        return body, images, chat, params, notes

    async def admit(raw: bytes):
        """Parse, load the images, tokenize and queue the request, in a worker thread (nothing of it
        on the event loop); (handle, body, notes)."""
        def work():
            body, images, chat, params, notes = parse(raw)
            forced = script_ids(tokenizer, body.vpt_force) if body.vpt_force else None
            return engine.submit(config.media.load_each(images), chat, params, forced, strict=True), body, notes

        try:
            return await run_in_threadpool(work)
        except MediaError as e:
            raise HTTPError(e.status, str(e), "messages") from None
        except RequestRejected as e:
            raise HTTPError(400, str(e), "messages") from None
        except ValueError as e:  # scripted tokens that encode to nothing
            raise HTTPError(400, str(e), "vpt_force") from None
        except QueueFull as e:
            raise HTTPError(429, str(e)) from None
        except (EngineClosed, EngineDead) as e:
            raise HTTPError(503, str(e)) from None

    writer = LogprobWriter(tokenizer)
    eos = engine.engine.vocab.im_end

    async def respond(handle, completion: Completion, request: Request, arrival: float, notes: dict):
        first = last = None
        results: dict[int, Any] = {}

        async def collect():
            nonlocal first, last
            async for event in handle:
                now = time.perf_counter() - arrival
                if isinstance(event, TokenEvent):
                    first = now if first is None else first
                    last = now
                elif isinstance(event, FinishEvent):
                    results[event.index] = event.result

        async def gone():
            while not await request.is_disconnected():
                await asyncio.sleep(0.05)

        collector, watcher = asyncio.ensure_future(collect()), asyncio.ensure_future(gone())
        done, _ = await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if collector not in done:  # the client left: stop the work
            handle.abort()
            await collector
        watcher.cancel()
        answers = [results[k] for k in sorted(results)]
        metrics.finished(answers, first, last)
        failed = next((r for r in answers if _engine_failure(r)), None)
        if failed is not None:
            return _error(500, failed.error)
        round1 = [tokenizer.decode(r.round1_ids, skip_special_tokens=True) for r in answers]
        logprobs = [writer.content(shown_logprobs(r, eos)) for r in answers] if answers[0].logprobs is not None else None
        return completion.response(answers, round1, notes, logprobs)

    async def stream(handle, completion: Completion, include_usage: bool, arrival: float, notes: dict):
        first = last = None
        params = handle.params
        decoders: dict[int, _Decoder] = {}
        results: dict[int, Any] = {}
        finished = False
        try:
            for k in range(params.n):
                yield _sse(completion.chunk({"role": "assistant", "content": ""}, index=k))
            async for event in handle:
                k = event.index
                decoder = decoders.get(k)
                if decoder is None:
                    decoder = decoders[k] = _Decoder(tokenizer, params.stop, params.include_stop_str_in_output)
                if isinstance(event, TokenEvent):
                    now = time.perf_counter() - arrival
                    first = now if first is None else first
                    last = now
                    delta = decoder.add(event.token_id)
                    extra = {} if event.logprob is None else {"logprobs": writer.content([event.logprob])}
                    if delta or extra:
                        yield _sse(completion.chunk({"content": delta}, index=k, **extra))
                elif isinstance(event, PerceptionEvent):
                    rest = decoder.next_round()
                    if rest:
                        yield _sse(completion.chunk({"content": rest}, index=k))
                    yield _sse(completion.chunk({}, index=k, vpt={"perception": trace_json(event.trace)}))
                elif isinstance(event, FinishEvent):
                    result = results[k] = event.result
                    rest = decoder.finish(result.text)
                    if rest:
                        yield _sse(completion.chunk({"content": rest}, index=k))
                    if not _engine_failure(result):
                        round1 = tokenizer.decode(result.round1_ids, skip_special_tokens=True)
                        finish = "length" if result.finish_reason == "length" else "stop"
                        yield _sse(completion.chunk({}, finish, index=k, stop_reason=result.stop_reason,
                                                    vpt=vpt_json(result, round1, notes)))
            finished = True
            answers = [results[k] for k in sorted(results)]
            metrics.finished(answers, first, last)
            failed = next((r for r in answers if _engine_failure(r)), None)
            if failed is not None:
                yield _sse(error_json(failed.error, 500))
            elif include_usage:
                yield _sse(completion.usage_chunk(answers))
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client left mid-stream: stop the work, count it when it ends
                handle.abort()
                asyncio.ensure_future(count_when_done(handle, first, last))

    async def count_when_done(handle, first, last):
        await handle.wait()
        metrics.finished(handle.results, first, last)

    return app


def _engine_failure(result) -> bool:
    """Whether an answer ended because the engine failed (a 500), not because of its request."""
    return result.finish_reason == "error" and bool(result.error) and result.error.startswith("engine failure")


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
