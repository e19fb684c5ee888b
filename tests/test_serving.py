"""`vpt-fast serve`: a real server on 127.0.0.1 (one per test session) spoken to with the official
`openai` client and raw HTTP. Its answers are the engine's; errors are OpenAI-style JSON with
their statuses; a client leaving mid-stream aborts its request."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import threading
import time

import httpx
import pytest
import torch
from serving_cases import KEY, MODEL, bomb_png, data_url, messages, metric, post
from vpt_cases import action, rand_image, region, toks

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from vpt_fast import SamplingParams  # noqa: E402
from vpt_fast.engine import AsyncEngine, Engine  # noqa: E402
from vpt_fast.serving.app import ServeConfig, build_app  # noqa: E402


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.base_url}/v1", api_key=KEY, max_retries=0)


def alone(bundle, image, text, script, max_tokens=8):
    (result,) = Engine(bundle).generate([image], ["<image>" + text], max_tokens,
                                        [toks(bundle.tokenizer, script)] if script else None)
    return result


CASES = [("region", region(([1, 3], [2]))), ("clip", action("clip")), ("plain", None)]


@pytest.mark.parametrize("kind,script", CASES, ids=[c[0] for c in CASES])
def test_the_openai_client_gets_the_engines_answer(tiny_bundle, client, kind, script):
    image = rand_image(90 + len(kind), 70, len(kind))
    want = alone(tiny_bundle("clip"), image, "What is on the left?", script)
    extra = {"vpt_force": script} if script else {}
    got = client.chat.completions.create(model=MODEL, messages=messages(image), max_tokens=8, temperature=0,
                                         extra_body=extra)
    choice = got.choices[0]
    assert choice.message.content == want.text
    vpt = choice.model_extra["vpt"]
    assert vpt["token_ids"] == want.token_ids and vpt["finish_reason"] == want.finish_reason
    assert [(t["kind"], [tuple(b) for b in t["boxes"]]) for t in vpt["trace"]] == [(t.kind, t.boxes) for t in want.trace]
    assert choice.finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == want.prompt_tokens and got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.model_extra["spliced_visual_tokens"] == sum(t.tokens_spliced for t in want.trace)

    stream = client.chat.completions.create(model=MODEL, messages=messages(image), max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}, extra_body=extra)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    round1 = tiny_bundle("clip").tokenizer.decode(want.round1_ids, skip_special_tokens=True)
    assert text == (round1 + want.text if want.trace else want.text)
    perceptions = [c.choices[0].model_extra["vpt"]["perception"] for c in chunks
                   if c.choices and "perception" in (c.choices[0].model_extra.get("vpt") or {})]
    assert [p["kind"] for p in perceptions] == [t.kind for t in want.trace]
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][0]
    assert final.choices[0].model_extra["vpt"]["token_ids"] == want.token_ids
    assert chunks[-1].usage.completion_tokens == len(want.token_ids) and not chunks[-1].choices


def test_several_images_through_the_openai_client(tiny_ckpt, client):
    """Images in two user turns, three in all: the server answers what transformers' generate
    answers on the same model (no perception is asked), and a perception looks at the first."""
    from hf_inputs import HFInputs
    from transformers import Qwen2VLForConditionalGeneration

    folder = tiny_ckpt("clip")
    images = [rand_image(84, 56, 61), rand_image(56, 84, 62), rand_image(100, 70, 63)]
    turns = [("user", [0, "and", 1]), ("assistant", "Two pictures."), ("user", ["A third: ", 2, "?"])]

    def render(image_part):  # the turns as chat messages, image k as image_part(k)
        return [{"role": role, "content": content if isinstance(content, str) else [
            image_part(p) if isinstance(p, int) else {"type": "text", "text": p} for p in content]}
            for role, content in turns]

    chat = render(lambda k: {"type": "image_url", "image_url": {"url": data_url(images[k])}})
    got = client.chat.completions.create(model=MODEL, messages=chat, max_tokens=8, temperature=0)
    inputs = HFInputs(folder)
    hf_chat = render(lambda k: {"type": "image", "image": images[k]})
    x = inputs.apply_chat_template([hf_chat], tokenize=True, add_generation_prompt=True, return_dict=True,
                                   return_tensors="pt", padding=True)
    model = Qwen2VLForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        want = Qwen2VLForConditionalGeneration.generate(model, **x, max_new_tokens=8)[0, x["input_ids"].shape[1]:]
    want = want.tolist()
    end = inputs.tokenizer.convert_tokens_to_ids("<|im_end|>")
    want = want[: want.index(end) + 1] if end in want else want
    assert got.choices[0].model_extra["vpt"]["token_ids"] == want
    assert got.usage.prompt_tokens == x["input_ids"].shape[1]
    looked = client.chat.completions.create(model=MODEL, messages=chat, max_tokens=8, temperature=0,
                                            extra_body={"vpt_force": region(([0, 1], [0]))})
    (trace,) = looked.choices[0].model_extra["vpt"]["trace"]
    w, h = images[0].size  # cells x 0-1, y 0, widened by one: x 0-2, y 0-1 of the first image
    assert trace["image"] == 0 and trace["boxes"] == [[0, 0, int(3 * w / 8), int(2 * h / 8)]]


def test_sixteen_concurrent_clients(tiny_bundle, served, client):
    base_url, engine = served.base_url, served.engine
    bundle = tiny_bundle("clip")
    jobs = [(rand_image(60 + 5 * i, 50 + 3 * i, 100 + i), f"Question {i}?", CASES[i % 3][1]) for i in range(16)]
    want = [alone(bundle, image, text, script) for image, text, script in jobs]
    before = {k: metric(base_url, "vpt_fast_perceptions_total", f'kind="{k}"') for k in ("region", "clip")}
    finished_before = sum(metric(base_url, "vpt_fast_requests_total", f'finish_reason="{r}"') for r in ("stop", "length"))
    results = [None] * 16

    def ask(i):
        image, text, script = jobs[i]
        results[i] = client.chat.completions.create(model=MODEL, messages=messages(image, text), max_tokens=8,
                                                    temperature=0, extra_body={"vpt_force": script} if script else {})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, w in zip(results, want):
        assert got.choices[0].message.content == w.text and got.choices[0].model_extra["vpt"]["token_ids"] == w.token_ids
    for kind in ("region", "clip"):
        made = sum(1 for w in want for t in w.trace if t.kind == kind)
        assert metric(base_url, "vpt_fast_perceptions_total", f'kind="{kind}"') - before[kind] == made
    finished = sum(metric(base_url, "vpt_fast_requests_total", f'finish_reason="{r}"') for r in ("stop", "length"))
    assert finished - finished_before == 16
    assert metric(base_url, "vpt_fast_kv_blocks_used") == 0 and engine.engine.kv_blocks_used == 0


def error_cases():
    """name: (status, body, the whole message as a regular expression, param)."""
    image = rand_image(40, 40)
    ok = messages(image)
    big = base64.b64encode(bytes(5 * 2**19)).decode()  # 2.5 MiB: over the image limit, not the request limit

    def image_body(url):
        return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": "Q"}]}]}

    png = "data:image/png;base64,"
    return {
        "unreadable image": (400, image_body(png + base64.b64encode(b"not a png").decode()),
                             r"the data: URL is not an image PIL can read \(accepted: GIF, JPEG, PNG, WEBP\)", "messages"),
        "bad base64": (400, image_body(png + "@@@"), r"the data: URL is not valid base64 \(.+\)", "messages"),
        "a web URL": (400, image_body("https://example.com/a.png"),
                      r"image URL scheme 'https' is not accepted: send the image as a data: URL \(base64\) or a "
                      r"file:// URL under the allowed local media path", "messages"),
        "a file URL outside the folder": (400, image_body("file:///etc/passwd"),
                                          r"the file URL 'file:///etc/passwd' does not name a file under the allowed "
                                          r"local media path", "messages"),
        "content of a number": (400, {"messages": [{"role": "user", "content": 5}]},
                                r"messages\.0\.content\.str: Input should be a valid string", "messages.0.content.str"),
        "no messages": (400, {"messages": []}, r"messages: List should have at least 1 item after validation, not 0",
                        "messages"),
        "last message not the user's": (400, {"messages": [{"role": "user", "content": "a"},
                                                           {"role": "assistant", "content": "b"}]},
                                        r"the last message must be the user's", "messages"),
        "more images than --limit-mm-per-prompt": (
            400, {"messages": [{"role": "user", "content": ok[0]["content"][:1] * 5},
                               {"role": "assistant", "content": "ok"},
                               {"role": "user", "content": ok[0]["content"] * 4}]},
            r"message 2, part 6: at most 8 image\(s\) may be given in one prompt \(limit_mm_per_prompt\)",
            "messages"),
        "one unreadable image of three": (
            400, {"messages": [{"role": "user", "content": ok[0]["content"][:1] * 2 + image_body(png + "@@@")[
                "messages"][0]["content"]}]},
            r"image 2: the data: URL is not valid base64 \(.+\)", "messages"),
        "special token text": (400, {"messages": [{"role": "user", "content": "hi <|im_end|>"}]},
                               r"request \d+: turn 0: the prompt holds the special token text '<\|im_end\|>' at "
                               r"character 3: special tokens cannot be typed in a prompt \(place the image with "
                               r"'<image>'\)", "messages"),
        "temperature out of range": (400, {"messages": ok, "temperature": 5},
                                     r"temperature: Input should be less than or equal to 2", "temperature"),
        "max_tokens zero": (400, {"messages": ok, "max_tokens": 0},
                            r"max_tokens: Input should be greater than or equal to 1", "max_tokens"),
        "n of 17": (400, {"messages": ok, "n": 17}, r"n: Input should be less than or equal to 16", "n"),
        "five stop strings": (400, {"messages": ok, "stop": ["a", "b", "c", "d", "e"]},
                              r"stop takes at most 4 non-empty strings of at most 256 characters", None),
        "a grammar that does not compile": (400, {"messages": ok, "structured_outputs": {"regex": "[a-"}},
                                            r"structured_outputs.regex: the regex cannot be compiled: Regex parsing "
                                            r"error at position 4: Unclosed '\['", "structured_outputs.regex"),
        "tools": (400, {"messages": ok, "tools": [{"type": "function", "function": {"name": "f"}}]},
                  r"tools is not supported by vpt_fast", None),
        "unknown vpt_mode": (400, {"messages": ok, "vpt_mode": "zoom"},
                             r"vpt_mode: Input should be 'region', 'reencode' or 'free'", "vpt_mode"),
        "image over the byte limit": (413, image_body(png + big), r"the image is over the limit of 2097152 bytes",
                                      "messages"),
        "decompression bomb": (413, image_body(png + base64.b64encode(bomb_png(20000, 20000)).decode()),
                               r"the data: URL: refused \(Image size \(400000000 pixels\) exceeds limit of \d+ "
                               r"pixels, could be decompression bomb DOS attack\.\)", "messages"),
        "image over the pixel limit": (413, image_body(png + base64.b64encode(bomb_png(5000, 3000)).decode()),
                                       r"the data: URL is 5000x3000 pixels, over the limit of 10000000", "messages"),
        "another model": (404, {"model": "gpt-9", "messages": ok},
                          r"the model 'gpt-9' does not exist here: this server serves 'tiny-clip'", "model"),
    }


@pytest.mark.parametrize("case", list(error_cases()))
def test_errors_are_openai_json(served, case):
    base_url = served.base_url
    status, body, message, param = error_cases()[case]
    reply = post(base_url, body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert re.fullmatch(message, error["message"]), error["message"]
    assert error["code"] == status and error["param"] == param and error["type"]
    ok = post(base_url, {"messages": messages(rand_image(30, 30)), "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200  # and the server still answers


def test_the_api_key_is_required(served):
    base_url = served.base_url
    body = {"messages": messages(rand_image(30, 30)), "max_tokens": 2}
    for key in (None, "wrong"):
        reply = post(base_url, body, key=key)
        assert reply.status_code == 401 and "API key" in reply.json()["error"]["message"]
    assert httpx.get(f"{base_url}/v1/models").status_code == 401
    models = httpx.get(f"{base_url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert models["data"][0]["id"] == MODEL
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}


def test_a_client_leaving_mid_stream_aborts_its_request(served):
    base_url, engine = served.base_url, served.engine
    aborted = metric(base_url, "vpt_fast_requests_total", 'finish_reason="abort"')
    body = {"messages": messages(rand_image(50, 50)), "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as reply:
        lines = reply.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
    deadline = time.monotonic() + 30
    while metric(base_url, "vpt_fast_requests_total", 'finish_reason="abort"') == aborted:
        assert time.monotonic() < deadline, "the request was not aborted"
        time.sleep(0.05)
    assert engine.engine.kv_blocks_used == 0 and engine.num_in_flight == 0


def test_limit_mm_per_prompt_from_the_command_line(tiny_bundle):
    """`vpt-fast serve --limit-mm-per-prompt` in vLLM's two spellings reaches the app: a request
    within it is answered, one past it is a 400 naming the limit (an app of its own, in process)."""
    from vpt_fast.cli import build_parser

    parse = lambda value: build_parser().parse_args(["serve", "--limit-mm-per-prompt", value])  # noqa: E731
    assert parse('{"image": 2}').limit_mm_per_prompt == 2 and parse("image=0").limit_mm_per_prompt == 0
    assert build_parser().parse_args(["serve"]).limit_mm_per_prompt == 8
    engine = AsyncEngine(Engine(tiny_bundle("clip")))
    app = build_app(engine, ServeConfig(model_name=MODEL, limit_mm_per_prompt=parse("image=2").limit_mm_per_prompt),
                    shutdown_timeout=None)
    part = messages(rand_image(30, 30))[0]["content"][0]

    async def ask(images):
        body = {"messages": [{"role": "user", "content": [part] * images + [{"type": "text", "text": "Q"}]}],
                "max_tokens": 2, "temperature": 0}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
            return await http.post("/v1/chat/completions", json=body)

    try:
        assert asyncio.run(ask(2)).status_code == 200
        over = asyncio.run(ask(3))
        assert over.status_code == 400 and over.json()["error"]["message"] == (
            "message 0, part 2: at most 2 image(s) may be given in one prompt (limit_mm_per_prompt)")
    finally:
        engine.shutdown()


def test_queue_full_and_shutting_down(tiny_bundle):
    """429 when the waiting queue is at its bound, 503 once the engine shuts down (an app of its own,
    called in process)."""
    engine = AsyncEngine(Engine(tiny_bundle("clip")), max_queue=1)
    app = build_app(engine, ServeConfig(model_name=MODEL), shutdown_timeout=None)
    body = {"messages": messages(rand_image(30, 30)), "max_tokens": 2, "temperature": 0}

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            with engine.engine._one_call():  # the loop cannot step: the first request waits
                first = asyncio.ensure_future(http.post("/v1/chat/completions", json=body))
                while engine.queue_depth() == 0:
                    await asyncio.sleep(0.01)
                full = await http.post("/v1/chat/completions", json=body)
            assert (await first).status_code == 200
            engine.shutdown()
            closed = await http.post("/v1/chat/completions", json=body)
            health = await http.get("/health")
            return full, closed, health

    full, closed, health = asyncio.run(scenario())
    assert full.status_code == 429 and "queue is full" in full.json()["error"]["message"]
    assert closed.status_code == 503 and "shutting down" in closed.json()["error"]["message"]
    assert health.status_code == 503


def test_system_prompt_turns_and_modes(tiny_bundle, client):
    from vpt_fast.prompt import Conversation

    bundle = tiny_bundle("clip")
    image = rand_image(64, 48, 7)
    chat = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": [{"type": "text", "text": "Hi."}]},
            {"role": "user", "content": [{"type": "text", "text": "Look: "},
                                         {"type": "image_url", "image_url": {"url": data_url(image)}},
                                         {"type": "text", "text": " what is it?"}]}]
    got = client.chat.completions.create(model=MODEL, messages=chat, max_tokens=6, temperature=0,
                                         extra_body={"vpt_mode": "region"})
    conversation = Conversation((("user", "Hello"), ("assistant", "Hi."),
                                 ("user", "Look: <image> what is it? Identify the region that can help you answer the "
                                          "question, and then answer the question.")), system="Answer briefly.")
    (want,) = Engine(bundle).generate([image], [conversation], 6)
    assert got.choices[0].model_extra["vpt"]["token_ids"] == want.token_ids
    sampled = [client.chat.completions.create(model=MODEL, messages=chat, max_tokens=6, temperature=0.8, seed=11)
               for _ in range(2)]
    (want,) = Engine(bundle).generate([image], [Conversation(conversation.turns[:-1] + (
        ("user", "Look: <image> what is it?"),), system="Answer briefly.")], 6, do_sample=True, temperature=0.8, seed=11)
    assert [s.choices[0].model_extra["vpt"]["token_ids"] for s in sampled] == [want.token_ids] * 2


def test_metrics_carry_the_engines_counters(served):
    base_url = served.base_url
    image = rand_image(30, 30, 99)
    before = metric(base_url, "vpt_fast_prefix_cache_hits_total")
    for text in ("What is on the left?", "And on the right?"):  # the same image twice: the second finds it
        body = {"messages": messages(image, text), "max_tokens": 2, "temperature": 0}
        assert post(base_url, body).status_code == 200
    stats = served.engine.engine.stats()
    names = {"preemptions": "vpt_fast_engine_preemptions", "recomputed_tokens": "vpt_fast_engine_recomputed_tokens",
             "computed_prompt_tokens": "vpt_fast_engine_computed_prompt_tokens",
             "cached_prompt_tokens": "vpt_fast_engine_cached_prompt_tokens",
             "spliced_tokens": "vpt_fast_engine_spliced_tokens", "prefix_cache_queries": "vpt_fast_prefix_cache_queries",
             "prefix_cache_hits": "vpt_fast_prefix_cache_hits", "vision_cache_queries": "vpt_fast_mm_cache_queries",
             "vision_cache_hits": "vpt_fast_mm_cache_hits", "vision_encoder_images": "vpt_fast_engine_vision_encoder_images"}
    for name, exported in names.items():
        assert metric(base_url, f"{exported}_total") == stats[name], name
    assert stats["computed_prompt_tokens"] > 0 and metric(base_url, "vpt_fast_prefix_cache_hits_total") > before


# ---------------------------------------------------------------------------- what real clients send


def engine_answer(bundle, image, text, params):
    """The engine's own answers (all n) to one request, alone."""
    engine = Engine(bundle)
    rid = engine.add_request(image, "<image>" + text, params)
    out = {}
    while engine.has_unfinished():
        for e in engine.step():
            if e.request == rid and hasattr(e, "result"):
                out[e.index] = e.result
    return [out[k] for k in sorted(out)]


def streamed(stream) -> tuple[dict[int, str], dict[int, list], dict[int, str]]:
    """Per choice index: the streamed text, the logprob entries, the finish reason."""
    text, logprobs, finish = {}, {}, {}
    for c in stream:
        for ch in c.choices:
            text[ch.index] = text.get(ch.index, "") + (ch.delta.content or "")
            if ch.logprobs is not None and ch.logprobs.content:
                logprobs.setdefault(ch.index, []).extend(ch.logprobs.content)
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    return text, logprobs, finish


def test_logprobs_n_and_penalties_through_the_openai_client(tiny_bundle, served, client):
    """n = 3 sampled answers with a seed, presence and frequency penalties, logprobs with 4
    alternatives: each choice is the engine's answer k (tokens, text), its logprobs the engine's
    (the tokens of its content, the ending <|im_end|> left out), streamed as not; the same call
    again gives the same choices."""
    bundle = tiny_bundle("clip")
    image = rand_image(70, 60, 5)
    params = SamplingParams(max_new_tokens=10, do_sample=True, temperature=0.9, seed=42, n=3, presence_penalty=0.5,
                            frequency_penalty=0.3, logprobs=4)
    want = engine_answer(bundle, image, "What is on the left?", params)
    body = dict(model=MODEL, messages=messages(image), max_tokens=10, temperature=0.9, seed=42, n=3,
                presence_penalty=0.5, frequency_penalty=0.3, logprobs=True, top_logprobs=4)
    before = metric(served.base_url, "vpt_fast_generation_tokens_total")
    got = client.chat.completions.create(**body)
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert metric(served.base_url, "vpt_fast_generation_tokens_total") - before == sum(len(w.token_ids) for w in want)
    tok = bundle.tokenizer
    for c, w in zip(got.choices, want):
        assert c.model_extra["vpt"]["token_ids"] == w.token_ids and c.message.content == w.text
        shown = w.answer_ids if w.trace else w.round1_ids
        ids = shown[:-1] if shown and shown[-1] == bundle.vocab.im_end else shown
        entries = c.logprobs.content
        assert [e.token for e in entries] == [tok.decode([t], skip_special_tokens=False) for t in ids]
        assert [e.logprob for e in entries] == pytest.approx([x.logprob for x in w.logprobs[len(w.logprobs) - len(shown):]][: len(ids)])
        assert all(len(e.top_logprobs) == 4 and e.bytes == list(e.token.encode()) for e in entries)
    assert got.usage.completion_tokens == sum(len(w.token_ids) for w in want)
    again = client.chat.completions.create(**body)
    assert [c.message.content for c in again.choices] == [c.message.content for c in got.choices]
    text, logprobs, finish = streamed(client.chat.completions.create(**body, stream=True))
    for k, w in enumerate(want):
        if not w.trace:  # a perception's round-1 tokens come before it in a stream
            assert text[k] == w.text and [e.logprob for e in logprobs[k]] == pytest.approx([x.logprob for x in w.logprobs])
        assert finish[k] == ("length" if w.finish_reason == "length" else "stop")


def test_stop_strings_through_the_openai_client(tiny_bundle, client):
    """A stop string from the middle of the greedy answer: content and stream both end before it
    (or with it, include_stop_str_in_output), finish_reason "stop", stop_reason naming it."""
    bundle = tiny_bundle("clip")
    image = rand_image(50, 40, 6)
    (plain,) = engine_answer(bundle, image, "Tell me more.", SamplingParams(max_new_tokens=24, stop_token_ids=()))
    text = plain.text
    stop = next(text[i : i + 3] for i in range(3, len(text) - 3) if "\ufffd" not in text[i : i + 3]
                and text.find(text[i : i + 3]) == i)
    at = text.find(stop)
    for include in (False, True):
        body = dict(model=MODEL, messages=messages(image, "Tell me more."), max_tokens=24, temperature=0,
                    stop=[stop, "never-written"], extra_body={"include_stop_str_in_output": include})
        got = client.chat.completions.create(**body)
        c = got.choices[0]
        assert c.message.content == text[: at + (len(stop) if include else 0)]
        assert c.finish_reason == "stop" and c.model_extra["stop_reason"] == stop
        text_streamed, _, finish = streamed(client.chat.completions.create(**body, stream=True))
        assert text_streamed[0] == c.message.content and finish[0] == "stop"


@pytest.mark.parametrize("field", ["response_format json_schema", "response_format json_object",
                                   "structured_outputs choice", "structured_outputs regex"])
def test_structured_outputs_through_the_openai_client(client, field):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    body, check = {
        "response_format json_schema": (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}},
            lambda t: set(json.loads(t)) == {"ok", "n"} and json.loads(t)["n"] in (1, 2, 3)),
        "response_format json_object": ({"response_format": {"type": "json_object"}},
                                        lambda t: isinstance(json.loads(t), dict)),
        "structured_outputs choice": ({"extra_body": {"structured_outputs": {"choice": ["cat", "dog"]}}},
                                      lambda t: t in ("cat", "dog")),
        "structured_outputs regex": ({"extra_body": {"structured_outputs": {"regex": "[0-9]{3}"}}},
                                     lambda t: re.fullmatch("[0-9]{3}", t) is not None),
    }[field]
    # no image: the answer is constrained from its first token
    call = dict(model=MODEL, messages=[{"role": "user", "content": "Answer."}], max_tokens=120, temperature=1.0, seed=3,
                n=4, **body)
    got = client.chat.completions.create(**call)
    for c in got.choices:
        if field.endswith("json_object") and c.finish_reason == "length":
            continue  # an unbounded object may outgrow the limit
        assert c.finish_reason == "stop" and check(c.message.content), c.message.content
    text, _, finish = streamed(client.chat.completions.create(**call, stream=True))
    assert [text[k] for k in range(4)] == [c.message.content for c in got.choices]
    assert [finish[k] for k in range(4)] == [c.finish_reason for c in got.choices]
