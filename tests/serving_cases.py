"""What the server tests share: the session's server (started once, in a thread of the test
process, with the limits `vpt-fast serve` sets), request bodies and readers of its answers."""

from __future__ import annotations

import base64
import io
import re
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import httpx

KEY = "test-key"
MODEL = "tiny-clip"
HEADER_TIMEOUT = 1.0  # seconds, short so that the tests of slow clients are quick


@dataclass
class Served:
    base_url: str
    port: int
    engine: object  # the AsyncEngine
    media: Path  # the allowed local media folder


def start_server(app, *, header_timeout: float = HEADER_TIMEOUT, max_connections: int = 64):
    """(uvicorn.Server, thread, port) of `app` on 127.0.0.1, bound to a port the OS chose."""
    import uvicorn

    from vpt_fast.serving.server import uvicorn_config

    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", 0, max_connections, header_timeout, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, port


def data_url(image, fmt="PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def bomb_png(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = b"IDAT" + zlib.compress(b"\x00" * 16)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", zlib.crc32(idat))
            + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))


def messages(image, text="What is on the left?"):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                         {"type": "text", "text": text}]}]


def post(base_url, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=headers, timeout=60, **kw)


def metric(base_url: str, name: str, labels: str = "") -> float:
    body = httpx.get(f"{base_url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" ([0-9.e+-]+)"
    found = re.search(pattern, body)
    return float(found.group(1)) if found else 0.0
