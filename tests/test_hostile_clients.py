"""The server against hostile clients (the session's server, `serving_cases`): one request cannot
hurt another, nothing is read before the key, nothing the server resolved leaks, slow or silent
connections are closed, and normal requests keep being answered with flat memory throughout."""

from __future__ import annotations

import os
import resource
import socket
import threading
import time

import httpx
import pytest
from serving_cases import HEADER_TIMEOUT, KEY, messages, post
from vpt_cases import rand_image

pytest.importorskip("fastapi")

OK_BODY = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3, "temperature": 0}


def assert_still_answers(base_url: str) -> None:
    reply = post(base_url, OK_BODY)
    assert reply.status_code == 200, reply.text


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def error_of(reply) -> dict:
    assert reply.headers["content-type"].startswith("application/json"), reply.text[:200]
    return reply.json()["error"]


# ----------------------------------------------------------------------------- sampling


def test_a_tiny_temperature_hurts_nobody(served):
    """temperature 1e-300 used to overflow the logits and end every request in flight."""
    base_url = served.base_url
    normal = [{"messages": messages(rand_image(40 + i, 40, i)), "max_tokens": 12, "temperature": 0.7, "seed": i}
              for i in range(3)]
    hostile = {"messages": messages(rand_image(41, 41, 9)), "max_tokens": 12, "temperature": 1e-300, "seed": 3}
    replies = [None] * 4

    def send(i, body):
        replies[i] = post(base_url, body)

    threads = [threading.Thread(target=send, args=(i, b)) for i, b in enumerate(normal + [hostile])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in replies] == [200] * 4, [r.text for r in replies]
    vpt = replies[3].json()["choices"][0]["vpt"]
    assert vpt["warnings"] == ["temperature 1e-300 is below 0.01: raised to 0.01"]
    assert vpt["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30])
def test_a_seed_outside_what_a_generator_takes_is_a_400(served, seed):
    reply = post(served.base_url, {**OK_BODY, "temperature": 0.5, "seed": seed})
    assert reply.status_code == 400 and error_of(reply)["param"] == "seed", reply.text


# ----------------------------------------------------------------------------- the key and the size, before the body


def big_body(mib: int) -> bytes:
    return b'{"messages": [{"role": "user", "content": "' + b"a" * (mib * 2**20) + b'"}]}'


def test_no_key_no_reading(served):
    """A request without the key is answered 401 from its headers alone: the server does not wait
    for the body it declares (57 MB here, never sent), and says nothing about the request."""
    base_url = served.base_url
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 59768832\r\n\r\n")
    got = raw(served.port, head + b'{"messages": [', 5)
    assert got.startswith(b"HTTP/1.1 401"), got[:200]
    assert got.endswith(b"<closed>")  # answered and closed without waiting for the declared body
    for _ in range(2):
        reply = httpx.post(f"{base_url}/v1/chat/completions", content=big_body(57),
                           headers={"Content-Type": "application/json"}, timeout=60)
        assert reply.status_code == 401
        assert error_of(reply)["message"] == "a valid API key is needed: Authorization: Bearer <key>"
    invalid = httpx.post(f"{base_url}/v1/chat/completions", json={"messages": "not a list", "n": 7}, timeout=10)
    assert invalid.status_code == 401 and "messages" not in invalid.text  # no validation details
    assert_still_answers(base_url)


def test_a_body_over_the_limit_is_refused_while_it_is_read(served):
    base_url = served.base_url
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    declared = httpx.post(f"{base_url}/v1/chat/completions", content=big_body(8), headers=headers, timeout=60)
    assert declared.status_code == 413 and "the request is over the limit of" in error_of(declared)["message"]
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Length: {8 * 2**20}\r\n\r\n").encode()
    assert raw(served.port, head, 5).startswith(b"HTTP/1.1 413")  # from the declared size, before any body

    def chunks():  # no Content-Length: the size shows only while reading
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(16):
            yield b"a" * 2**19

    streamed = httpx.post(f"{base_url}/v1/chat/completions", content=chunks(), headers=headers, timeout=60)
    assert streamed.status_code == 413 and "over the limit" in error_of(streamed)["message"]
    lying = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
             f"Content-Length: abc\r\n\r\n{{}}").encode()
    assert raw(served.port, lying, 5).startswith(b"HTTP/1.1 400")
    assert_still_answers(base_url)


def test_metrics_are_behind_the_key_when_protected(served):
    assert httpx.get(f"{served.base_url}/metrics").status_code == 401
    reply = httpx.get(f"{served.base_url}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert reply.status_code == 200 and "vpt_fast_requests_total" in reply.text
    assert httpx.get(f"{served.base_url}/health").status_code == 200  # health stays public


# ----------------------------------------------------------------------------- paths


@pytest.fixture(scope="module")
def media(served):
    """The allowed folder: an image, a text file, a folder, a symlink out, a symlink loop."""
    root = served.media
    rand_image(30, 30, 1).save(root / "ok.png")
    (root / "notes.txt").write_text("not an image")
    (root / "folder").mkdir(exist_ok=True)
    for name, target in (("out", "/proc/self/exe"), ("loop_a", root / "loop_b"), ("loop_b", root / "loop_a")):
        if not (root / name).is_symlink():
            os.symlink(target, root / name)
    return root


def image_url_body(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "What is it?"}]}],
            "max_tokens": 2, "temperature": 0}


def test_file_urls_leak_nothing(served, media):
    base_url = served.base_url
    ok = post(base_url, image_url_body(f"file://{media}/ok.png"))
    assert ok.status_code == 200, ok.text
    urls = ["file:///proc/self/exe", f"file://{media}/out", f"file://{media}/missing.png", f"file://{media}/folder",
            f"file://{media}/loop_a", f"file://{media}/x%00y.png", f"file://{media}/{'n' * 300}.png",
            f"file://{media}/../../etc/passwd", f"file://{media}/%ff%fe"]
    for url in urls:
        reply = post(base_url, image_url_body(url))
        assert reply.status_code == 400, (url, reply.text)
        message = error_of(reply)["message"]
        shown = repr(url if len(url) <= 120 else url[:120] + "...")
        assert message == f"the file URL {shown} does not name a file under the allowed local media path", message
        for leak in ("python", "/root", str(os.getpid()), os.getcwd()):
            assert leak not in message.replace(str(media), ""), (url, message)
    not_image = post(base_url, image_url_body(f"file://{media}/notes.txt"))
    assert not_image.status_code == 400 and "is not an image PIL can read" in error_of(not_image)["message"]
    assert_still_answers(base_url)


# ----------------------------------------------------------------------------- long text


def test_long_text_is_refused_before_tokenizing(served):
    base_url = served.base_url
    reply = post(base_url, {**OK_BODY, "vpt_force": "x" * 900_000})  # under the size limit, over the text bound
    assert reply.status_code == 400, reply.text
    assert "characters of text, more than the" in error_of(reply)["message"]
    assert_still_answers(base_url)


def test_health_answers_while_the_longest_text_is_prepared(served, tiny_bundle):
    """The longest text the server reads, tokenized in a worker thread with Python's lock released:
    /health keeps answering meanwhile."""
    base_url = served.base_url
    longest = max(len(t) for t in tiny_bundle("clip").tokenizer.get_vocab())
    limit = served.engine.engine.max_seq_len * longest
    body = {**OK_BODY, "messages": [{"role": "user", "content": "Hello world! " * (limit // 13 - 10)}]}
    done = threading.Event()
    replies = []

    def send():
        replies.append(post(base_url, body))
        done.set()

    worst = 0.0
    threading.Thread(target=send, daemon=True).start()
    while not done.is_set():
        start = time.perf_counter()
        assert httpx.get(f"{base_url}/health", timeout=10).status_code == 200
        worst = max(worst, time.perf_counter() - start)
    assert replies[0].status_code == 400 and "more than max_seq_len" in error_of(replies[0])["message"]
    assert worst < 1.0, f"/health took {worst:.3f} s"  # it used to stall for seconds


# ----------------------------------------------------------------------------- connections


def raw(port: int, data: bytes, wait: float) -> bytes:
    """Send `data` on a fresh connection and read until the server closes it (or `wait` passes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        if data:
            s.sendall(data)
        got = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return got + b"<closed>"
                got += chunk
        except socket.timeout:
            return got + b"<open>"


def test_silent_and_half_sent_connections_are_closed(served):
    wait = HEADER_TIMEOUT + 4
    assert raw(served.port, b"", wait).endswith(b"<closed>")
    assert raw(served.port, b"POST /v1/chat/completions HT", wait).endswith(b"<closed>")
    trickle = socket.create_connection(("127.0.0.1", served.port), timeout=wait)
    try:
        closed = False
        for piece in (b"GET /health HTTP/1.1\r\n", b"Host: x\r\n", b"X-A: 1\r\n", b"X-B: 2\r\n", b"X-C: 3\r\n"):
            try:
                trickle.sendall(piece)
                time.sleep(0.4)  # a slowloris: a byte now and then, never the end of the headers
            except OSError:
                closed = True
                break
        if not closed:
            closed = trickle.recv(100) == b""
        assert closed  # by the server: a read past the header deadline would have timed out instead
    finally:
        trickle.close()


def test_oversized_headers_are_refused(served):
    got = raw(served.port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n", 5)
    assert got.startswith(b"HTTP/1.1 431") and got.endswith(b"<closed>")


# ----------------------------------------------------------------------------- errors are JSON, unknown fields are named


def test_unknown_fields_are_ignored_and_named(served):
    reply = post(served.base_url, {**OK_BODY, "guided_choice": ["a", "b"], "user": "me", "stop": None,
                                   "presence_penalty": 0})
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["vpt"]["ignored_fields"] == ["guided_choice", "user"]
    plain = post(served.base_url, OK_BODY)
    assert "ignored_fields" not in plain.json()["choices"][0]["vpt"]


def test_an_unexpected_failure_is_a_json_500_with_a_request_id(served, monkeypatch, caplog):
    from vpt_fast.serving import protocol

    def broken(self):
        raise KeyError("internal detail /secret/path")

    monkeypatch.setattr(protocol.ChatCompletionRequest, "ignored_fields", broken)
    with caplog.at_level("ERROR", logger="vpt_fast.serving"):
        reply = post(served.base_url, OK_BODY)
    assert reply.status_code == 500
    error = error_of(reply)
    assert error["message"].startswith("internal error; the server's log has the details under req-")
    assert "secret" not in reply.text and "Traceback" not in reply.text
    request_id = error["message"].rsplit(" ", 1)[1]
    assert any(request_id in r.getMessage() and r.exc_info for r in caplog.records)
    monkeypatch.undo()
    assert_still_answers(served.base_url)


def test_bad_json_and_wrong_shapes_are_400s(served):
    base_url = served.base_url
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for content in (b"{", b"[]", b'"text"', b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "x"}',
                    b"\xff\xfe", b'{"messages": [{"role": "robot", "content": "hi"}]}'):
        reply = httpx.post(f"{base_url}/v1/chat/completions", content=content, headers=headers, timeout=10)
        assert reply.status_code == 400, (content, reply.text)
        assert error_of(reply)["code"] == 400


# ----------------------------------------------------------------------------- memory


def test_memory_stays_flat_under_hostile_traffic(served, media):
    base_url = served.base_url
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

    def round_of_abuse():
        httpx.post(f"{base_url}/v1/chat/completions", content=big_body(20), timeout=60)
        httpx.post(f"{base_url}/v1/chat/completions", content=big_body(6), headers=headers, timeout=60)
        post(base_url, image_url_body(f"file://{media}/loop_a"))
        post(base_url, {**OK_BODY, "temperature": 1e-300})
        post(base_url, {"messages": messages(rand_image(64, 64, 5)), "max_tokens": 4, "temperature": 0})

    round_of_abuse()  # allocator pools and caches settle
    before = rss_mib()
    for _ in range(5):
        round_of_abuse()
    grown = rss_mib() - before
    assert grown < 64, f"memory grew by {grown:.0f} MiB over 5 rounds"
    assert served.engine.engine.kv_blocks_used == 0 and served.engine.num_in_flight == 0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0
    assert_still_answers(base_url)
