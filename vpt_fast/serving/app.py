"""The OpenAI-compatible HTTP app over an `AsyncEngine`.

Routes: POST /v1/chat/completions (streaming with SSE or not), GET /v1/models, GET /health,
GET /metrics (Prometheus text); with `ServeConfig.replica_id`, every response names its
replica in an `x-vpt-fast-replica` header. Errors are OpenAI-style JSON bodies: 400 for an unreadable
image, a bad message or an out-of-range parameter, 401 for a wrong or missing key, 404 for
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
import json
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..chat import from_messages
from ..engine import AsyncEngine, EngineClosed, EngineDead, FinishEvent, PerceptionEvent, QueueFull, RequestRejected, TokenEvent
from ..media import MediaError, MediaPolicy
from ..prompt import encode
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, Completion, error_json, trace_json, vpt_json


@dataclass(frozen=True)
class ServeConfig:
    model_name: str = "vpt-fast"
    api_key: str | None = None
    media: MediaPolicy = MediaPolicy()
    default_max_tokens: int = 256
    replica_id: str | None = None  # sent as the x-vpt-fast-replica header of every response (Ray Serve)


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_json(message, status, param=param), status_code=status)


class _Decoder:
    """Incremental text of a growing list of token ids (special tokens left out): a delta is
    held back while it ends inside a multi-byte character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def flush(self) -> str:
        """What is left once the tokens end (a character cut short included, as the answer has it)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent = text
        return delta


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
    app.state.engine = engine
    app.state.metrics = metrics

    if config.replica_id is not None:
        @app.middleware("http")
        async def _replica_header(request: Request, call_next):
            response = await call_next(request)
            response.headers["x-vpt-fast-replica"] = config.replica_id
            return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{where + ': ' if where else ''}{first.get('msg', 'invalid request')}", where or None)

    @app.exception_handler(HTTPError)
    async def _http(request: Request, exc: HTTPError):
        return _error(exc.status, str(exc), exc.param)

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {config.api_key}":
            raise HTTPError(401, "a valid API key is needed: Authorization: Bearer <key>")

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
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "vpt_fast"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        arrival = time.perf_counter()
        authorize(request)
        if body.model is not None and body.model != config.model_name:
            raise HTTPError(404, f"the model {body.model!r} does not exist here: this server serves {config.model_name!r}",
                            "model")
        try:
            params = body.sampling_params(config.default_max_tokens)
            image, chat = from_messages(body.messages_as_dicts(), mode=body.vpt_mode)
        except (TypeError, ValueError) as e:
            raise HTTPError(400, str(e), "messages") from None
        forced = encode(tokenizer, body.vpt_force) if body.vpt_force else None  # serialised with the engine's encodes
        handle = await submit(image, chat, params, forced)
        completion = Completion(config.model_name)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(handle, completion, include_usage, arrival), media_type="text/event-stream")
        return await respond(handle, completion, request, arrival)

    async def submit(image, chat, params, forced):
        def load_and_submit():
            loaded = config.media.load(image) if isinstance(image, str) else image
            return engine.submit(loaded, chat, params, forced, strict=True)

        try:
            return await run_in_threadpool(load_and_submit)
        except MediaError as e:
            raise HTTPError(e.status, str(e), "messages") from None
        except RequestRejected as e:
            raise HTTPError(400, str(e), "messages") from None
        except QueueFull as e:
            raise HTTPError(429, str(e)) from None
        except (EngineClosed, EngineDead) as e:
            raise HTTPError(503, str(e)) from None

    async def respond(handle, completion: Completion, request: Request, arrival: float):
        first = last = None
        round1: list[int] = []
        result = None

        async def collect():
            nonlocal first, last, result
            async for event in handle:
                now = time.perf_counter() - arrival
                if isinstance(event, TokenEvent):
                    first = now if first is None else first
                    last = now
                    if event.round == 0:
                        round1.append(event.token_id)
                elif isinstance(event, FinishEvent):
                    result = event.result

        async def gone():
            while not await request.is_disconnected():
                await asyncio.sleep(0.05)

        collector, watcher = asyncio.ensure_future(collect()), asyncio.ensure_future(gone())
        done, _ = await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if collector not in done:  # the client left: stop the work
            handle.abort()
            await collector
        watcher.cancel()
        metrics.finished(result, first, last)
        if result.finish_reason == "error" and result.error and result.error.startswith("engine failure"):
            return _error(500, result.error)
        return completion.response(result, tokenizer.decode(result.round1_ids, skip_special_tokens=True))

    async def stream(handle, completion: Completion, include_usage: bool, arrival: float):
        first = last = None
        decoder = _Decoder(tokenizer)
        result = None
        try:
            yield _sse(completion.chunk({"role": "assistant", "content": ""}))
            async for event in handle:
                if isinstance(event, TokenEvent):
                    now = time.perf_counter() - arrival
                    first = now if first is None else first
                    last = now
                    delta = decoder.add(event.token_id)
                    if delta:
                        yield _sse(completion.chunk({"content": delta}))
                elif isinstance(event, PerceptionEvent):
                    yield _sse(completion.chunk({}, vpt={"perception": trace_json(event.trace)}))
                elif isinstance(event, FinishEvent):
                    result = event.result
            metrics.finished(result, first, last)
            rest = decoder.flush()
            if rest:
                yield _sse(completion.chunk({"content": rest}))
            if result.finish_reason == "error" and result.error and result.error.startswith("engine failure"):
                yield _sse(error_json(result.error, 500))
            else:
                round1 = tokenizer.decode(result.round1_ids, skip_special_tokens=True)
                finish = "length" if result.finish_reason == "length" else "stop"
                yield _sse(completion.chunk({}, finish, vpt=vpt_json(result, round1)))
                if include_usage:
                    yield _sse(completion.usage_chunk(result))
            yield "data: [DONE]\n\n"
        finally:
            if result is None:  # the client left mid-stream: stop the work, count it when it ends
                handle.abort()
                asyncio.ensure_future(count_when_done(handle, first, last))

    async def count_when_done(handle, first, last):
        metrics.finished(await handle.wait(), first, last)

    return app


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
