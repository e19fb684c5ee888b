"""Shared fixtures: tiny VPT checkpoints (built once per test session) and their loaded bundles."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

# Everything the tests need is on disk: never reach the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# What the package builds once and keeps (the compiled extension, the demo checkpoint) goes to a
# folder of this test session, removed at its end: tests never read or write the user's cache.
# A VPT_FAST_BUILD_DIR / VPT_FAST_CACHE already set is used as it is (to keep builds across runs).
_SESSION_CACHE = tempfile.mkdtemp(prefix="vpt_fast_tests_")
os.environ.setdefault("VPT_FAST_CACHE", _SESSION_CACHE)
os.environ.setdefault("VPT_FAST_BUILD_DIR", os.path.join(_SESSION_CACHE, "ext"))
atexit.register(shutil.rmtree, _SESSION_CACHE, ignore_errors=True)

import torch  # noqa: E402

# Without a GPU, Triton kernels run in Triton's interpreter. It must be on before anything
# imports triton (transformers may), or triton's own helpers are compiled-only.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vpt_fast.checkpoint import load_vpt_checkpoint
from vpt_fast.tiny import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """``tiny_ckpt(variant) -> Path``: a tiny checkpoint folder in the released format.

    Built once per variant and shared by every test: tests that alter files must copy it first.
    """
    cache = {}

    def get(variant: str):
        if variant not in cache:
            root = tmp_path_factory.mktemp(f"tiny_{variant}")
            cache[variant] = make_tiny_checkpoint(root / variant, variant)
        return cache[variant]

    return get


@pytest.fixture(scope="session")
def tiny_bundle(tiny_ckpt):
    """``tiny_bundle(variant) -> VPTBundle``: ``load_vpt_checkpoint`` of ``tiny_ckpt(variant)``, cached."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            cache[variant] = load_vpt_checkpoint(tiny_ckpt(variant))
        return cache[variant]

    return get


@pytest.fixture(scope="session")
def served(tiny_bundle, tmp_path_factory):
    """The session's server (`serving_cases.Served`): the tiny clip model behind the API key,
    /metrics protected, file:// URLs allowed inside a folder of its own, small image limits."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from serving_cases import KEY, MODEL, Served, start_server

    from vpt_fast.engine import AsyncEngine, Engine
    from vpt_fast.media import MediaPolicy
    from vpt_fast.serving.app import ServeConfig, build_app

    media = tmp_path_factory.mktemp("media")
    engine = AsyncEngine(Engine(tiny_bundle("clip")), max_queue=64)
    config = ServeConfig(model_name=MODEL, api_key=KEY, protect_metrics=True,
                         media=MediaPolicy(max_image_bytes=2 * 2**20, max_image_pixels=10_000_000,
                                           allowed_local_media_path=str(media)))
    server, thread, port = start_server(build_app(engine, config))
    yield Served(f"http://127.0.0.1:{port}", port, engine, media)
    server.should_exit = True
    thread.join(timeout=30)
    assert not engine.accepting  # the app's shutdown stopped the engine
