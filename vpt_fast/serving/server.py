"""`vpt-fast serve`: load a checkpoint (or the demo one), start the engine loop and the
OpenAI-compatible app under uvicorn."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from ..engine import AsyncEngine, Engine
from ..engine.scheduler import DEFAULT_MAX_NUM_BATCHED_TOKENS
from ..media import MediaPolicy
from .app import ServeConfig, build_app

logger = logging.getLogger("vpt_fast.serving")


def make_app(args, replica_id: str | None = None):
    """The app `vpt-fast serve` runs, from its parsed arguments (device resolved, dtype set);
    replica_id: the name of a Ray Serve replica, sent in a response header."""
    from ..checkpoint import load_vpt_checkpoint

    if args.model is None:
        from ..tiny import demo_checkpoint

        model_path = demo_checkpoint("region")
        logger.warning("no --model given: serving a tiny RANDOM checkpoint (%s); its answers are noise", model_path)
    else:
        model_path = Path(args.model)
    bundle = load_vpt_checkpoint(model_path, dtype=args.dtype, device=args.device)
    engine = Engine(bundle, max_seq_len=args.max_seq_len, max_batch_size=args.max_batch_size,
                    kv_cache_gib=args.kv_cache_gib,
                    max_num_batched_tokens=args.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS,
                    enable_prefix_caching=args.enable_prefix_caching, encoder_cache_gib=args.encoder_cache_gib)
    if engine.graph_capture is not None:
        capture = engine.graph_capture
        logger.warning("warm-up: decode graphs for batch sizes up to %d captured in %.1f s (%.0f MiB)",
                       capture.buckets[-1], capture.seconds, capture.bytes / 2**20)
    media = MediaPolicy(max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
                        allowed_local_media_path=args.allowed_local_media_path)
    config = ServeConfig(model_name=args.served_model_name or model_path.name, api_key=args.api_key, media=media,
                         default_max_tokens=args.default_max_tokens, replica_id=replica_id,
                         max_request_bytes=args.max_request_bytes, protect_metrics=args.protect_metrics,
                         limit_mm_per_prompt=args.limit_mm_per_prompt)
    return build_app(AsyncEngine(engine, max_queue=args.max_queue), config)


MAX_HEADER_BYTES = 32 * 2**10  # a request's line and headers together
KEEP_ALIVE_SECONDS = 5  # an idle connection between requests


def guarded_protocol(header_timeout: float, max_header_bytes: int = MAX_HEADER_BYTES):
    """uvicorn's h11 protocol with two guards on each request's line and headers, which uvicorn
    leaves open: a deadline (a connection that sends nothing, or half a request, is closed after
    `header_timeout` seconds; uvicorn's keep-alive timeout covers only the idle time after a
    response) and a size (431 past `max_header_bytes`, however the bytes arrive)."""
    import json

    from uvicorn.protocols.http.h11_impl import H11Protocol

    from .protocol import error_json

    body = json.dumps(error_json(f"the request line and headers are over {max_header_bytes} bytes", 431)).encode()
    too_large = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                 b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    class GuardedProtocol(H11Protocol):
        _deadline = None
        _head_bytes = 0  # bytes of the request line and headers read so far
        _head_tail = b""  # the last bytes read, for an end of headers split across reads

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._between_requests():
                joined = self._head_tail + data
                end = joined.find(b"\r\n\r\n")
                seen = self._head_bytes + (len(data) if end < 0 else end + 4 - len(self._head_tail))
                if seen > max_header_bytes:
                    self.transport.write(too_large)
                    self.transport.close()
                    return
                self._head_bytes, self._head_tail = (seen, joined[-3:]) if end < 0 else (0, b"")
            super().data_received(data)
            if self._between_requests():
                self._arm()  # still reading a request's headers: the deadline stands (it is not reset)
            else:
                self._disarm()  # a request's headers are in: it runs

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self):
            if self._deadline is None:
                self._deadline = self.loop.call_later(header_timeout, self._expire)

        def _disarm(self):
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self):
            self._deadline = None
            if self._between_requests():
                self.transport.close()

    return GuardedProtocol


def uvicorn_config(app, host: str, port: int, max_connections: int, header_timeout: float, log_level: str = "info"):
    """uvicorn's settings for a server facing the open network: a bounded header size, a header
    deadline, a keep-alive timeout and a connection limit (503 past it), all explicit."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=guarded_protocol(header_timeout),
                          h11_max_incomplete_event_size=MAX_HEADER_BYTES, timeout_keep_alive=KEEP_ALIVE_SECONDS,
                          limit_concurrency=max_connections)


def serve(args) -> int:
    """Run the server until it is stopped (0) or its engine dies (1: a device failure poisons
    the process, so it exits for a supervisor to restart it)."""
    import uvicorn

    app = make_app(args)
    engine: AsyncEngine = app.state.engine
    server = uvicorn.Server(uvicorn_config(app, args.host, args.port, args.max_connections, args.header_timeout))

    def exit_when_dead():
        reason = engine.wait_dead()
        if reason is not None:
            logger.error("the engine is dead (%s): the server exits", reason)
            server.should_exit = True

    threading.Thread(target=exit_when_dead, name="vpt_fast-health", daemon=True).start()
    server.run()
    return 1 if engine.dead is not None else 0
