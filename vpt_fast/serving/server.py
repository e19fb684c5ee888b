"""`vpt-fast serve`: load a checkpoint (or the demo one), start the engine loop and the
OpenAI-compatible app under uvicorn."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from ..engine import AsyncEngine, Engine
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
                    kv_cache_gib=args.kv_cache_gib)
    if engine.graph_capture is not None:
        capture = engine.graph_capture
        logger.warning("warm-up: decode graphs for batch sizes up to %d captured in %.1f s (%.0f MiB)",
                       capture.buckets[-1], capture.seconds, capture.bytes / 2**20)
    media = MediaPolicy(max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
                        allowed_local_media_path=args.allowed_local_media_path)
    config = ServeConfig(model_name=args.served_model_name or model_path.name, api_key=args.api_key, media=media,
                         default_max_tokens=args.default_max_tokens, replica_id=replica_id)
    return build_app(AsyncEngine(engine, max_queue=args.max_queue), config)


def serve(args) -> int:
    """Run the server until it is stopped (0) or its engine dies (1: a device failure poisons
    the process, so it exits for a supervisor to restart it)."""
    import uvicorn

    app = make_app(args)
    engine: AsyncEngine = app.state.engine
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info"))

    def exit_when_dead():
        reason = engine.wait_dead()
        if reason is not None:
            logger.error("the engine is dead (%s): the server exits", reason)
            server.should_exit = True

    threading.Thread(target=exit_when_dead, name="vpt_fast-health", daemon=True).start()
    server.run()
    return 1 if engine.dead is not None else 0
