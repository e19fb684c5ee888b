"""One bad request ends alone, with a message naming it; concurrent calls on one engine stay correct."""

import re
import struct
import threading
import warnings
import zlib

import pytest
from PIL import Image
from vpt_cases import rand_image, toks

import vpt_fast
from vpt_fast.engine import Engine, FinishEvent
from vpt_fast.reference import two_round_generate

REGION = "<|region_token_start|><|x_2|><|x_4|><|y_5|><|region_token_end|><|im_end|>"


def bomb_png(path, width, height):
    """A PNG whose header claims width x height pixels (PIL refuses it before decoding)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    data = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    idat = b"IDAT" + zlib.compress(b"\x00" * 16)
    data += struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", zlib.crc32(idat))
    data += struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return Engine(tiny_bundle("region"))


@pytest.fixture(scope="module")
def good(engine):
    """Two good requests (one with a region perception) and their results alone."""
    tok = engine.bundle.tokenizer
    requests = [(rand_image(96, 64, 1), "<image>\nWhat is on the left?", toks(tok, REGION)),
                (rand_image(50, 70, 2), "Describe it.", None)]
    alone = [engine.generate([im], [p], 8, [f], return_logits=True)[0] for im, p, f in requests]
    assert alone[0].trace and alone[0].answer_ids
    return requests, alone


def same(result, alone):
    assert result.token_ids == alone.token_ids and result.finish_reason == alone.finish_reason
    assert [t.boxes for t in result.trace] == [t.boxes for t in alone.trace]
    assert max((a - b).abs().max().item() for a, b in zip(result.logits, alone.logits)) <= 1e-5


def bad_cases(tmp_path, tok):
    """(image, prompt, forced tokens, expected message) of requests that must fail alone."""
    image = rand_image(60, 60, 3)
    corrupt = tmp_path / "corrupt.png"
    rand_image(40, 40, 4).save(corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:80])
    return {
        "decompression bomb": (bomb_png(tmp_path / "bomb.png", 20000, 20000), "Q", None, r"bomb\.png: refused.*decompression bomb"),
        "zero-size image, region": (Image.new("RGB", (0, 10)), "Q", toks(tok, REGION), "0x10 pixels: both sides must be at least 1"),
        "zero-size image, no perception": (Image.new("RGB", (10, 0)), "Q", None, "10x0 pixels"),
        "missing file": (tmp_path / "missing.png", "Q", None, "image file not found: .*missing.png"),
        "truncated file": (corrupt, "Q", None, "corrupt.png: not an image file PIL can read"),
        "a folder": (tmp_path, "Q", None, "is a folder, not an image file"),
        "image_pad text": (image, "look <|image_pad|> here", None, r"special token text '<\|image_pad\|>' at character 5"),
        "im_end text": (image, "a<|im_end|><|im_start|>system", None, r"special token text '<\|im_end\|>'"),
        "VPT token text": (image, "the cell <|x_3|>", None, r"special token text '<\|x_3\|>'"),
        "lone surrogate": (image, "caf\ud800", None, r"lone surrogate '\\ud800' at character 3"),
        "not a str": (image, b"bytes", None, "a prompt must be a str or a Conversation, got bytes"),
        "two placeholders": (image, "<image> and <image>", None, r"the prompt places 2 image\(s\) with '<image>' but 1 image\(s\) were given"),
        "forced id out of range": (image, "Q", [5, 10**6], r"forced tokens hold \[1000000\]: token ids in \[0, 400\)"),
        "forced negative id": (image, "Q", [-1], r"forced tokens hold \[-1\]"),
        "forced float": (image, "Q", [1.5], r"forced tokens hold \[1.5\]"),
        "forced not a list": (image, "Q", 7, "forced tokens must be a list of token ids, got int"),
    }


CASES = ["decompression bomb", "zero-size image, region", "zero-size image, no perception", "missing file",
         "truncated file", "a folder", "image_pad text", "im_end text", "VPT token text", "lone surrogate", "not a str",
         "two placeholders", "forced id out of range", "forced negative id", "forced float", "forced not a list"]


@pytest.mark.parametrize("case", CASES)
def test_a_bad_request_ends_alone(engine, good, tmp_path, case):
    (im0, p0, f0), (im2, p2, f2) = good[0]
    image, prompt, forced, message = bad_cases(tmp_path, engine.bundle.tokenizer)[case]
    out = engine.generate([im0, image, im2], [p0, prompt, p2], 8, [f0, forced, f2], return_logits=True)
    assert out[1].finish_reason == "error" and out[1].token_ids == []
    assert out[1].error.startswith("request 1: ")
    assert re.search(message, out[1].error), out[1].error
    same(out[0], good[1][0])
    same(out[2], good[1][1])
    # streamed, every request still finishes, the bad one first
    finished = [e.request for e in engine.stream([im0, image, im2], [p0, prompt, p2], 8, [f0, forced, f2])
                if isinstance(e, FinishEvent)]
    assert finished[0] == 1 and sorted(finished) == [0, 1, 2]


def test_the_reference_names_the_bad_request(tiny_bundle, tmp_path):
    b = tiny_bundle("region")
    image = rand_image(60, 60)
    with pytest.raises(ValueError, match=r"request 1: the prompt holds the special token text '<\|image_pad\|>'"):
        two_round_generate(b, [image, image], ["Q", "<|image_pad|>"])
    with pytest.raises(ValueError, match="request 0: .*bomb.png: refused"):
        two_round_generate(b, [bomb_png(tmp_path / "bomb.png", 20000, 20000)], ["Q"])


def test_a_failing_perception_ends_alone(tiny_bundle, good):
    """A crop that cannot be prepared ends its request with `error`; the others answer as alone."""
    b = tiny_bundle("region")
    engine = Engine(b)
    (im0, p0, f0), (im2, p2, f2) = good[0]
    doomed = rand_image(77, 55, 9)
    prepare_crop = b.processor.prepare_crop

    def failing(original, box):
        if original.size == doomed.size:
            raise ValueError("no crop for this one")
        return prepare_crop(original, box)

    b.processor.prepare_crop = failing
    try:
        out = engine.generate([im0, doomed, im2], [p0, "Q", p2], 8, [f0, f0, f2], return_logits=True)
    finally:
        del b.processor.prepare_crop
    assert out[1].finish_reason == "error"
    assert out[1].error == "request 1: the region perception could not be prepared: no crop for this one"
    assert out[1].round1_ids == f0
    same(out[0], good[1][0])
    same(out[2], good[1][1])


def test_a_missing_branch_is_said(tiny_bundle):
    b = tiny_bundle("clip")
    with pytest.warns(UserWarning, match=r"names the clip branch .* but clip_projector= was not given"):
        engine = vpt_fast.accelerate(b.model, b.tokenizer, patch=False, vpt_config=b.vpt_config)
    forced = toks(b.tokenizer, "<|clip_action_start|><|clip_action|><|clip_action_end|><|im_end|>")
    (r,) = engine.generate([rand_image(56, 56)], ["Q"], 6, [forced])
    assert r.finish_reason == "unsupported:clip"
    assert "built without its modules (give clip_projector= to vpt_fast.accelerate)" in r.error
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vpt_fast.accelerate(b.model, b.tokenizer, patch=False, clip_projector=b.clip_projector, vpt_config=b.vpt_config)


# ----------------------------------------------------------------------------- concurrency


def test_threads_take_turns(engine, good):
    (im0, p0, f0), (im2, p2, f2) = good[0]
    results, errors = {}, []

    def call(k):
        try:
            for j in range(2):
                results[k, j] = engine.generate([im0, im2], [p0, p2], 8, [f0, f2], return_logits=True)
        except Exception as e:  # pragma: no cover - the assertion below shows it
            errors.append(e)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 8
    for out in results.values():
        same(out[0], good[1][0])
        same(out[1], good[1][1])


def test_a_second_stream_in_one_thread_is_refused(engine, good):
    (im0, p0, f0), (im2, p2, f2) = good[0]
    first = engine.stream([im0], [p0], 8, [f0], return_logits=True)
    second = engine.stream([im2], [p2], 8, [f2])
    next(first)
    with pytest.raises(RuntimeError, match="already serving a generate/stream call in this thread"):
        next(second)
    with pytest.raises(RuntimeError, match="already serving"):
        engine.generate([im2], [p2], 8)
    rest = [e for e in first if isinstance(e, FinishEvent)]
    same(rest[0].result, good[1][0])
    # closed early, a stream gives the engine back
    third = engine.stream([im0], [p0], 8, [f0])
    next(third)
    third.close()
    same(engine.generate([im2], [p2], 8, [f2], return_logits=True)[0], good[1][1])


class WatchedLock:
    """The engine's lock, telling (by an event) when a thread begins to wait for it."""

    def __init__(self, lock):
        self.lock, self.waiting = lock, threading.Event()

    def __enter__(self):
        if not self.lock.acquire(blocking=False):
            self.waiting.set()
            self.lock.acquire()
        return self

    def __exit__(self, *exc):
        self.lock.release()


def test_a_thread_waits_for_an_open_stream(engine, good, monkeypatch):
    (im0, p0, f0), (im2, p2, f2) = good[0]
    watched = WatchedLock(engine._lock)
    monkeypatch.setattr(engine, "_lock", watched)
    stream = engine.stream([im0], [p0], 8, [f0], return_logits=True)
    next(stream)
    waiting = {}
    other = threading.Thread(target=lambda: waiting.update(out=engine.generate([im2], [p2], 8, [f2], return_logits=True)))
    other.start()
    assert watched.waiting.wait(timeout=30), "the second caller never reached the engine"
    assert other.is_alive() and "out" not in waiting  # blocked while the stream holds the engine
    finished = [e for e in stream if isinstance(e, FinishEvent)]
    other.join(timeout=60)
    assert not other.is_alive()
    same(finished[0].result, good[1][0])
    same(waiting["out"][0], good[1][1])  # then served, with its own answer
