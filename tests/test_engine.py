"""The single-pass engine against the two-round reference (docs/vpt.md §9)."""

import functools
import re

import pytest
import torch
from golden_cases import (GOLDEN, GROUPS, KNOWN_DIFFERENCES, ROUND1_MAX_NEW_TOKENS, ROUND2_MAX_NEW_TOKENS, call_inputs,
                          check_record)
from paths import ORIGINAL
from vpt_cases import action, rand_image, region, toks

import vpt_fast
from vpt_fast.checkpoint import load_vpt_checkpoint
from vpt_fast.engine import Engine, FinishEvent, TokenEvent
from vpt_fast.prompt import conversation, encode, user_content, vision_span
from vpt_fast.reference import two_round_generate

def assert_same(ref, eng, tol=1e-4):
    assert eng.round1_ids == ref.round1_ids
    assert eng.answer_ids == ref.answer_ids
    assert eng.token_ids == ref.round1_ids + ref.answer_ids
    assert eng.text == ref.text
    assert eng.finish_reason == ref.finish_reason
    ref_logits = (ref.round1_logits or []) + (ref.answer_logits or [])
    assert len(eng.logits) == len(ref_logits)
    worst = max(((a - b).abs().max().item() for a, b in zip(ref_logits, eng.logits)), default=0.0)
    assert worst <= tol, f"logits differ by {worst:.3g}"


def both(bundle, images, prompts, forced_text, max_new_tokens=10, **kw):
    tok = bundle.tokenizer
    forced = [toks(tok, f) if f else None for f in forced_text]
    ref = two_round_generate(bundle, images, prompts, max_new_tokens, forced, return_logits=True, **kw)
    eng = Engine(bundle).generate(images, prompts, max_new_tokens, forced, return_logits=True, **kw)
    return ref, eng


@functools.cache
def published_bundle(variant):
    return load_vpt_checkpoint(ORIGINAL / variant)


def run_published_group(group):
    """The engine on the requests of one golden.json call, in one call -> [(name, record, result)]."""
    records = GROUPS[group]
    engine = Engine(published_bundle(records[0][1]["variant"]))
    images, prompts, forced = call_inputs(engine.bundle.tokenizer, records)
    results = engine.generate(images, prompts, ROUND1_MAX_NEW_TOKENS, forced,
                              answer_max_new_tokens=ROUND2_MAX_NEW_TOKENS, return_logits=True)
    return [(name, rec, r) for (name, rec), r in zip(records, results)]


def check_engine(name, rec, r, skip=()):
    n1 = len(r.round1_ids)
    kind = r.finish_reason if r.finish_reason.startswith("unsupported:") else r.perception.kind
    # the conversation the engine ends with: round 1's prompt, then (after a perception) round 2's
    # prompt, then the answer
    round2_prompt = r.sequence_ids[: len(r.sequence_ids) - len(r.answer_ids)] if r.trace else None
    check_record(name, rec, round1_prompt_ids=r.sequence_ids[: r.prompt_tokens], round1_ids=r.round1_ids,
                 round2_prompt_ids=round2_prompt, answer_ids=r.answer_ids, boxes=[b for t in r.trace for b in t.boxes],
                 round1_logits=r.logits[:n1], answer_logits=r.logits[n1:], kind=kind, skip=skip)
    assert [t.kind for t in r.trace] == ([] if rec["round2_prompt_ids"] is None else [kind]), name


@pytest.mark.parametrize("group", list(GROUPS))
def test_engine_reproduces_published_implementation(group):
    """Every record of golden.json (the published class's two rounds), in one engine call per
    record or batch: the same tokens, boxes and conversation, logits within 1e-4. A record of
    KNOWN_DIFFERENCES is checked here except for the fields it names."""
    for name, rec, r in run_published_group(group):
        check_engine(name, rec, r, skip=KNOWN_DIFFERENCES.get(name, ((), ""))[0])


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=why))
                                  for n, (_, why) in KNOWN_DIFFERENCES.items()])
def test_engine_published_departures_from_the_spec(name):
    (found,) = [(n, rec, r) for n, rec, r in run_published_group(GOLDEN[name].get("batch", name)) if n == name]
    check_engine(*found)


@pytest.mark.parametrize("variant,forced", [
    ("region", region(([2, 4], [5, 6]))),
    ("region", region(([2, 4], [5, 6]), ([0], [0, 1]), ([7], [7]))),
    ("clip", action("clip")),
    ("dino", action("dino")),
    ("sam", action("sam")),
], ids=["region-1", "region-3", "clip", "dino", "sam"])
def test_single_request_equals_reference(tiny_bundle, variant, forced):
    b = tiny_bundle(variant)
    (ref,), (eng,) = both(b, [rand_image(196, 112, 4)], ["<image>\nWhat is on the left?"], [forced])
    assert ref.round2_prompt_ids is not None
    assert_same(ref, eng)
    (trace,) = eng.trace
    assert trace.kind == variant
    assert trace.tokens_spliced == len(ref.round2_prompt_ids) - len(ref.round1_prompt_ids) - len(ref.round1_ids) + 1
    assert trace.tokens_rolled_back == 0
    if variant == "region":
        assert trace.boxes == ref.boxes
        assert len(trace.cells) == len(ref.perception.blocks)


@pytest.mark.parametrize("variant", ["clip", "dino"])
def test_text_before_the_action_is_rolled_back(tiny_bundle, variant):
    b = tiny_bundle(variant)
    forced = "I need a closer look " + action(variant)
    (ref,), (eng,) = both(b, [rand_image(150, 90, 6)], ["Count the people."], [forced], max_new_tokens=30)
    assert_same(ref, eng)
    n_text = len(toks(b.tokenizer, "I need a closer look "))
    assert eng.trace[0].tokens_rolled_back == n_text + 3  # the text and start/action/end re-read as the fixed text


def test_free_choice_outcomes(tiny_bundle):
    b = tiny_bundle("clip")
    cases = [
        region(([1], [1]), eos=False) + action("clip"),  # several kinds
        "Just a plain answer<|im_end|>",  # nothing
        "<|region_token_start|><|x_1|><|region_token_end|><|im_end|>",  # malformed block
        action("dino"),  # a kind this checkpoint has no branch for
        None,  # free generation
    ]
    images = [rand_image(64 + 10 * i, 80, i) for i in range(len(cases))]
    ref, eng = both(b, images, ["Q?"] * len(cases), cases, max_new_tokens=24)
    for r, e in zip(ref, eng):
        assert_same(r, e)
        assert e.trace == []
    assert [e.finish_reason for e in eng[:4]] == ["stop", "stop", "malformed", "unsupported:dino"]


@pytest.mark.parametrize("variant", ["clip", "dino", "sam"])
def test_mixed_batch_of_eight(tiny_bundle, variant):
    b = tiny_bundle(variant)
    forced = [
        region(([2, 4], [5, 6])),
        action(variant),
        region(([0, 3], [1]), ([6], [2, 7]), ([4], [4])),
        "Well " + action(variant),
        region(([1], [1]), eos=False) + action(variant),
        "Plain text only<|im_end|>",
        "<|region_token_start|><|y_2|><|region_token_end|><|im_end|>",
        None,
    ]
    sizes = [(196, 112), (333, 517), (64, 64), (500, 90), (28, 300), (120, 120), (640, 480), (45, 61)]
    prompts = ["<image>\nWhat color?", "How many people are there in this picture?", "Where?",
               "<image> Describe the scene in detail, please.", "Hi", "<image>\nIs it raining?", "Name it.",
               "Tell me something about the objects on the right side of the image."]
    images = [rand_image(w, h, i) for i, (w, h) in enumerate(sizes)]
    ref, eng = both(b, images, prompts, forced)
    for r, e in zip(ref, eng):
        assert_same(r, e)
    assert sum(bool(e.trace) for e in eng) == 4


def test_batch_rows_give_what_they_give_alone(tiny_bundle):
    b = tiny_bundle("region")
    engine = Engine(b)
    tok = b.tokenizer
    images = [rand_image(100, 60, 1), rand_image(70, 90, 2), rand_image(200, 50, 3)]
    prompts = ["<image>What?", "Why?", "<image>\nWho is there?"]
    forced = [toks(tok, region(([1, 2], [3]))), toks(tok, "<|region_token_start|><|x_1|><|region_token_end|><|im_end|>"), None]
    batch = engine.generate(images, prompts, 8, forced, return_logits=True)
    assert batch[1].finish_reason == "malformed"
    for i in range(3):
        (alone,) = engine.generate([images[i]], [prompts[i]], 8, [forced[i]], return_logits=True)
        assert batch[i].token_ids == alone.token_ids
        assert batch[i].finish_reason == alone.finish_reason
        assert max((x - y).abs().max().item() for x, y in zip(batch[i].logits, alone.logits)) <= 1e-5


def test_no_room_for_the_splice_and_full_cache(tiny_bundle):
    b = tiny_bundle("region")
    tok = b.tokenizer
    image = rand_image(196, 112, 0)
    prompt = "<image>\nWhat?"
    forced = toks(tok, region(([2, 4], [5, 6])))
    (full,) = Engine(b).generate([image], [prompt], 10, [forced], return_logits=True)
    assert full.trace  # with room, the crop is spliced
    prompt_len = len(encode(tok, conversation([("user", user_content(prompt, vision_span("<|image_pad|>", 28)))])))
    room = prompt_len + len(full.round1_ids) + 3  # enough for round 1, not for the crop
    small = Engine(b, max_seq_len=room)
    other = rand_image(60, 60, 1)
    out = small.generate([image, other], [prompt, "Hi"], 10, [forced, None], return_logits=True)
    assert out[0].finish_reason == "no_room" and "segment needs" in out[0].error
    assert out[0].round1_ids == full.round1_ids and out[0].answer_ids == []
    (alone,) = Engine(b, max_seq_len=room).generate([other], ["Hi"], 10, return_logits=True)
    assert out[1].token_ids == alone.token_ids
    # decoding past the slot ends with "length" and the tokens so far are the unconstrained ones
    tight = Engine(b, max_seq_len=prompt_len + 3).generate([image], [prompt], 20, return_logits=True)[0]
    (free,) = Engine(b).generate([image], [prompt], 20, return_logits=True)
    assert tight.finish_reason == "length" and "reached max_seq_len" in tight.error
    assert tight.token_ids == free.token_ids[: len(tight.token_ids)] and len(tight.token_ids) == 4
    too_long = Engine(b, max_seq_len=10).generate([image], [prompt], 5)[0]
    assert too_long.finish_reason == "length" and too_long.token_ids == [] and "prompt has" in too_long.error


def test_bad_request_in_a_batch_does_not_stop_the_others(tiny_bundle, tmp_path):
    b = tiny_bundle("region")
    engine = Engine(b)
    good = rand_image(80, 80, 3)
    out = engine.generate([good, tmp_path / "missing.png", good], ["<image>A", "B", "<image> <image>"], 5)
    assert out[0].finish_reason in ("stop", "length") and out[0].token_ids
    assert out[1].finish_reason == "error" and "missing.png" in out[1].error
    assert out[2].finish_reason == "error" and "places 2 image(s) with '<image>' but 1 image(s)" in out[2].error
    (alone,) = engine.generate([good], ["<image>A"], 5)
    assert out[0].token_ids == alone.token_ids


def test_stream_events(tiny_bundle):
    b = tiny_bundle("clip")
    tok = b.tokenizer
    engine = Engine(b)
    images = [rand_image(90, 90, 1), rand_image(60, 120, 2)]
    forced = [toks(tok, action("clip")), None]
    events = list(engine.stream(images, ["A", "B"], 6, forced))
    results = engine.generate(images, ["A", "B"], 6, forced)
    for i in range(2):
        mine = [e for e in events if e.request == i]
        assert [e.token_id for e in mine if isinstance(e, TokenEvent)] == results[i].token_ids
        assert isinstance(mine[-1], FinishEvent) and mine[-1].result.token_ids == results[i].token_ids
    kinds = [type(e).__name__ for e in events if e.request == 0]
    first_perception = kinds.index("PerceptionEvent")
    assert kinds[:first_perception] == ["TokenEvent"] * 4  # start, action, end, <|im_end|>
    assert [e.round for e in events if isinstance(e, TokenEvent) and e.request == 0][4:] == [1] * 6


def test_max_perception_rounds_zero_and_sampling(tiny_bundle):
    b = tiny_bundle("region")
    tok = b.tokenizer
    engine = Engine(b)
    image = rand_image(100, 100)
    forced = [toks(tok, region(([3], [3])))]
    (none,) = engine.generate([image], ["Q"], 8, forced, max_perception_rounds=0)
    assert none.trace == [] and none.answer_ids == [] and none.finish_reason == "stop"
    s1 = engine.generate([image, image], ["a", "b"], 8, do_sample=True, top_k=20, top_p=0.8, seed=5)
    s2 = engine.generate([image, image], ["a", "b"], 8, do_sample=True, top_k=20, top_p=0.8, seed=5)
    assert [r.token_ids for r in s1] == [r.token_ids for r in s2]
    greedy = engine.generate([image, image], ["a", "b"], 8)
    top1 = engine.generate([image, image], ["a", "b"], 8, do_sample=True, top_k=1, seed=9)
    assert [r.token_ids for r in top1] == [r.token_ids for r in greedy]


class ScriptedEngine(Engine):
    """Forces every generated token from a script (all rounds), to reach a second perception."""

    script: list[int] = []

    def _choose(self, ready):
        chosen, logprobs = super()._choose(ready)
        return [self.script[len(r.generated)] if len(r.generated) < len(self.script) else t
                for r, t in zip(ready, chosen)], logprobs


def test_second_perception_equals_a_fresh_prefill(tiny_bundle):
    """After two region perceptions the cache gives the logits of the whole conversation read at once."""
    from vpt_fast.prompt import region_prompt

    b = tiny_bundle("region")
    tok, v, proc = b.tokenizer, b.vocab, b.processor
    image = rand_image(196, 112, 8)
    first_block, second_block = region(([2, 4], [5, 6])), region(([0], [0, 1]), ([6], [6]))
    engine = ScriptedEngine(b)
    engine.script = toks(tok, first_block) + toks(tok, second_block)
    (r,) = engine.generate([image], ["<image>\nWhere?"], 12, max_perception_rounds=2, return_logits=True)
    assert [t.kind for t in r.trace] == ["region", "region"]
    crops1 = [proc.prepare_crop(image, box) for box in r.trace[0].boxes]
    crops2 = [proc.prepare_crop(image, box) for box in r.trace[1].boxes]
    first = proc.prepare(image)
    span = lambda im: vision_span("<|image_pad|>", proc.token_count(im))
    turns = [("user", user_content("<image>\nWhere?", span(first))),
             ("assistant", first_block[: -len("<|im_end|>")]), ("user", region_prompt(1, [span(c) for c in crops1])),
             ("assistant", second_block[: -len("<|im_end|>")]), ("user", region_prompt(2, [span(c) for c in crops2]))]
    ids = torch.tensor([encode(tok, conversation(turns))])
    pixels, grid = proc.qwen_inputs([first, *crops1, *crops2])
    with torch.no_grad():
        logits = b.model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid,
                         mm_token_type_ids=(ids == v.image_pad).int()).logits[0, -1]
    n_before_answer = len(toks(tok, first_block)) + len(toks(tok, second_block))
    assert (r.logits[n_before_answer] - logits).abs().max() <= 1e-4


def test_accelerate_a_loaded_model(tiny_bundle):
    b = tiny_bundle("clip")
    engine = vpt_fast.accelerate(b.model, b.tokenizer, patch=False, clip_projector=b.clip_projector,
                                vpt_config=b.vpt_config.to_dict())
    image = rand_image(84, 84, 2)
    forced = [toks(b.tokenizer, action("clip"))]
    (mine,) = engine.generate([image], ["What?"], 6, forced)
    (loaded,) = Engine(b).generate([image], ["What?"], 6, forced)
    assert mine.token_ids == loaded.token_ids and mine.trace[0].kind == "clip"
    with pytest.raises(TypeError, match="Qwen2VLForConditionalGeneration"):
        vpt_fast.accelerate(torch.nn.Linear(2, 2), b.tokenizer)
    with pytest.raises(TypeError, match="processor must be"):
        vpt_fast.accelerate(b.model, object())
    with pytest.raises(ValueError, match="a clip projector was given but vpt_config names no clip action"):
        vpt_fast.accelerate(b.model, b.tokenizer, clip_projector=b.clip_projector)


def test_engine_argument_errors(tiny_bundle):
    engine = Engine(tiny_bundle("region"))
    image = rand_image(32, 32)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        engine.generate([image], ["a"], 0)
    with pytest.raises(ValueError, match="1 image entries for 2 prompts"):
        engine.generate([image], ["a", "b"])
    with pytest.raises(ValueError, match="max_perception_rounds"):
        engine.generate([image], ["a"], max_perception_rounds=-1)
    with pytest.raises(ValueError, match="max_seq_len"):
        Engine(tiny_bundle("region"), max_seq_len=1)


def test_device_image_pipeline(tiny_bundle):
    """Patches made on the device from the original image stay within PIL's rounding of the host path."""
    b = tiny_bundle("region")
    tok = b.tokenizer
    image = rand_image(333, 517, 5)
    forced = [toks(tok, region(([2, 4], [5, 6]), ([0], [7])))]
    pil = Engine(b).generate([image], ["<image>\nWhere?"], 10, forced)[0]
    device = Engine(b, image_pipeline="device").generate([image], ["<image>\nWhere?"], 10, forced)[0]
    assert [t.boxes for t in device.trace] == [t.boxes for t in pil.trace]
    assert device.round1_ids == pil.round1_ids and device.answer_ids == pil.answer_ids
    engine = Engine(b, image_pipeline="device")
    (r,) = engine.generate([image], ["Q"], 10, forced)
    crops = [b.processor.prepare_crop(image, box) for box in r.trace[0].boxes]
    request = engine.prepare(image, "Q")
    request.images += crops
    request.boxes += list(r.trace[0].boxes)
    request.sources += [0] * len(crops)
    rows, grid = engine._segments._device_pixels([(request, k) for k in range(3)])
    want, want_grid = b.processor.qwen_inputs([request.turn.first, *crops])
    assert torch.equal(grid, want_grid)
    std = torch.tensor(b.processor.qwen.image_std).repeat_interleave(2 * 14 * 14)
    assert ((rows - want).abs() * std).max() <= 2 / 255 + 1e-6
    with pytest.raises(ValueError, match="image_pipeline"):
        Engine(b, image_pipeline="gpu")


# ----------------------------------------------------------------------------- conversations


def test_conversations_with_a_system_prompt_and_earlier_turns(tiny_bundle):
    """Multi-turn conversations, the image in a later turn or none at all: the engine equals the
    two-round flow on them, and its first logits equal transformers' forward on the chat text
    written out here."""
    from vpt_fast.prompt import Conversation

    b = tiny_bundle("clip")
    tok, v, proc = b.tokenizer, b.vocab, b.processor
    image = rand_image(120, 90, 3)
    chats = [
        Conversation((("user", "Hi"), ("assistant", "Hello."), ("user", "What is in <image> this picture?")),
                     system="Answer briefly."),
        Conversation((("user", "<image>Describe."), ("assistant", "A street."), ("user", "Where?"))),
        Conversation((("user", "Tell me a story."),), system="You are terse."),
    ]
    images = [image, image, None]
    forced = [region(([1, 3], [2])), action("clip"), None]
    ref, eng = both(b, images, chats, forced)
    for r, e in zip(ref, eng):
        assert_same(r, e)
    assert [t.kind for t in eng[0].trace] == ["region"] and [t.kind for t in eng[1].trace] == ["clip"]
    first = proc.prepare(image)
    span = "<|vision_start|>" + "<|image_pad|>" * proc.token_count(first) + "<|vision_end|>"
    text = ("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
            "Hello.<|im_end|>\n<|im_start|>user\nWhat is in " + span + " this picture?<|im_end|>\n<|im_start|>assistant\n")
    ids = torch.tensor([toks(tok, text)])
    assert ids[0].tolist() == ref[0].round1_prompt_ids
    pixels, grid = proc.qwen_inputs([first])
    with torch.no_grad():
        logits = b.model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid,
                         mm_token_type_ids=(ids == v.image_pad).int()).logits[0, -1]
    assert (eng[0].logits[0] - logits).abs().max() <= 1e-4
    assert eng[2].prompt_tokens == len(ref[2].round1_prompt_ids) and eng[2].trace == []


def test_conversation_errors(tiny_bundle):
    from vpt_fast.prompt import Conversation

    b = tiny_bundle("region")
    engine = Engine(b)
    image = rand_image(50, 50)
    with pytest.raises(ValueError, match="the last turn of a conversation must be the user's"):
        Conversation((("user", "a"), ("assistant", "b")))
    with pytest.raises(ValueError, match="turn 0 has role 'system'"):
        Conversation((("system", "a"), ("user", "b")))
    cases = [
        (image, Conversation((("user", "<image>a"), ("assistant", "b"), ("user", "<image>c"))), r"the prompt places 2 image\(s\) with '<image>' but 1 image\(s\) were given"),
        (image, Conversation((("assistant", "look <image>"), ("user", "c"))), "turn 0 is the assistant's"),
        (None, Conversation((("user", "<image> what?"),)), "no image was given"),
        (image, Conversation((("user", "a"), ("assistant", "<|im_end|>"), ("user", "c"))), r"turn 1: the prompt holds the special"),
        (image, Conversation((("user", "a"),), system="x<|vision_start|>"), "the system prompt: the prompt holds"),
        (None, "Where is the car?", None),
    ]
    out = engine.generate([c[0] for c in cases], [c[1] for c in cases], 6,
                          [None] * 5 + [toks(b.tokenizer, region(([1], [1])))])
    for (_, _, message), r in zip(cases[:5], out[:5]):
        assert r.finish_reason == "error" and re.search(message, r.error), r.error
    assert out[5].finish_reason == "error" and "has no image to look at again" in out[5].error
