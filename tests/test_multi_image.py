"""Several images per conversation, through every entry point.

Against transformers' own generate on a stock tiny Qwen2-VL (inputs made as its processor
makes them, `mm_token_type_ids` included): prompts with 2 and 3 images, images in a later
turn, and a batch mixing 2, 1 and 0 images give the same greedy tokens through the patched
`model.generate` (left and right padding), `Engine.generate` (prompts with `<image>`) and
`Engine.chat`; the M-RoPE positions are transformers' `get_rope_index`. A perception looks at
the conversation's first image: the engine gives the tokens of the two-round reference
extended the same way, for every perception kind. One unreadable image of three ends its
request alone, naming the image; one vision-tower call serves every image admitted in a step;
the prefix cache tells apart blocks of different images.
"""

from __future__ import annotations

import base64
import io
import re
import warnings

import pytest
import torch
from hf_inputs import HFInputs, stock_generate
from vpt_cases import action, rand_image, region, toks

import vpt_fast
from vpt_fast import _hf_compat, spec
from vpt_fast.engine import Engine
from vpt_fast.prompt import Conversation
from vpt_fast.reference import two_round_generate

# multiples of 28 and not, so that the processors' resizing is part of what is compared
IMAGES = [rand_image(84, 56, 1), rand_image(56, 112, 2), rand_image(100, 70, 3), rand_image(56, 56, 4),
          rand_image(70, 126, 5)]


def image_part(k: int) -> dict:
    return {"type": "image", "image": IMAGES[k]}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


# name: chat messages (Hugging Face's shape, the images as parts where they stand)
CONVERSATIONS = {
    "two images": [{"role": "user", "content": [image_part(0), text_part("and"), image_part(1),
                                                text_part(": which is brighter?")]}],
    "three images": [{"role": "user", "content": [text_part("Pages "), image_part(2), image_part(3),
                                                  text_part(" and "), image_part(4), text_part(". Summarize.")]}],
    "later turn": [{"role": "user", "content": [text_part("Hello.")]},
                   {"role": "assistant", "content": "Hi, how can I help?"},
                   {"role": "user", "content": [image_part(1), text_part("What is it? And this one: "),
                                                image_part(0)]}],
    "one per turn": [{"role": "user", "content": [image_part(3), text_part("First picture.")]},
                     {"role": "assistant", "content": "A square."},
                     {"role": "user", "content": [text_part("Second: "), image_part(2), text_part(" compare.")]}],
    "one image": [{"role": "user", "content": [image_part(4), text_part("Describe.")]}],
    "text only": [{"role": "user", "content": [text_part("Tell me a story.")]}],
}


def images_of(messages) -> list:
    return [part["image"] for m in messages if isinstance(m["content"], list) for part in m["content"]
            if part["type"] == "image"]


def as_conversation(messages) -> Conversation:
    """The messages as an engine prompt: text with `<image>` where each image stands."""
    turns = []
    for m in messages:
        content = m["content"]
        text = content if isinstance(content, str) else "".join(
            "<image>" if part["type"] == "image" else part["text"] for part in content)
        turns.append((m["role"], text))
    return Conversation(tuple(turns))


@pytest.fixture(scope="module")
def plain(tiny_ckpt):
    """(a stock Qwen2-VL loaded by transformers, HFInputs for it, an Engine over it)."""
    from transformers import Qwen2VLForConditionalGeneration

    folder = tiny_ckpt("plain")
    model = Qwen2VLForConditionalGeneration.from_pretrained(folder).eval()
    inputs = HFInputs(folder)
    return model, inputs, vpt_fast.accelerate(model, inputs.tokenizer, patch=False, max_batch_size=4)


MAX_NEW = 10


def transformers_tokens(model, inputs, messages) -> list[int]:
    """transformers' greedy new tokens for one conversation, up to and including <|im_end|>."""
    x = inputs.apply_chat_template([messages], tokenize=True, add_generation_prompt=True, return_dict=True,
                                   return_tensors="pt", padding=True)
    new = stock_generate(model, **x, max_new_tokens=MAX_NEW)[0, x["input_ids"].shape[1]:].tolist()
    end = inputs.tokenizer.convert_tokens_to_ids(spec.IM_END)
    return new[: new.index(end) + 1] if end in new else new


@pytest.fixture(scope="module")
def expected(plain):
    model, inputs, _ = plain
    return {name: transformers_tokens(model, inputs, messages) for name, messages in CONVERSATIONS.items()}


def test_engine_generate_and_chat_equal_transformers(plain, expected):
    _, _, engine = plain
    names = list(CONVERSATIONS)
    prompts = [as_conversation(CONVERSATIONS[n]) for n in names]
    images = [images_of(CONVERSATIONS[n]) for n in names]
    got = engine.generate(images, prompts, MAX_NEW)
    for name, r in zip(names, got):
        assert r.finish_reason in ("stop", "length") and r.token_ids == expected[name], name
    chats = engine.chat([CONVERSATIONS[n] for n in names], vpt_fast.SamplingParams(max_new_tokens=MAX_NEW))
    assert [r.token_ids for r in chats] == [expected[n] for n in names]
    # a str prompt without placeholders: the images open it, as the chat template writes image parts first
    (first_two,) = engine.generate([[IMAGES[0], IMAGES[1]]], ["Compare them."], MAX_NEW)
    messages = [{"role": "user", "content": [image_part(0), image_part(1), text_part("Compare them.")]}]
    assert first_two.token_ids == transformers_tokens(plain[0], plain[1], messages)


@pytest.mark.parametrize("side", ["left", "right"])
def test_patched_generate_on_a_batch_of_2_1_0_and_3_images(plain, expected, side):
    model, inputs, _ = plain
    names = ["two images", "one image", "text only", "three images", "later turn"]
    convs = [CONVERSATIONS[n] for n in names]
    inputs.tokenizer.padding_side = side
    x = inputs.apply_chat_template(convs, tokenize=True, add_generation_prompt=True, return_dict=True,
                                   return_tensors="pt", padding=True)
    assert x["image_grid_thw"].shape[0] == 2 + 1 + 0 + 3 + 2 and "mm_token_type_ids" in x
    vpt_fast.accelerate(model, inputs.tokenizer, max_batch_size=4)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback to transformers' generate
            got = model.generate(**x, max_new_tokens=MAX_NEW)
        results = vpt_fast.last_results(model)
    finally:
        vpt_fast.restore(model)
    if side == "left":  # transformers' generate expects left padding: the batch as a whole
        assert torch.equal(got, stock_generate(model, **x, max_new_tokens=MAX_NEW))
    length = x["input_ids"].shape[1]
    for name, row, r in zip(names, got, results):
        assert r.token_ids == expected[name], name  # each sample gets what it gets alone
        assert row[length: length + len(r.token_ids)].tolist() == r.token_ids


def test_mrope_positions_are_transformers(plain):
    model, inputs, engine = plain
    for name in ("two images", "three images", "later turn", "one per turn"):
        messages = CONVERSATIONS[name]
        x = inputs.apply_chat_template([messages], tokenize=True, add_generation_prompt=True, return_dict=True,
                                       return_tensors="pt", padding=True)
        r = engine.prepare(images_of(messages), as_conversation(messages))
        assert r.error is None and r.ids == x["input_ids"][0].tolist(), name
        want = _hf_compat.rope_index(model, x["input_ids"], x["mm_token_type_ids"], x["image_grid_thw"],
                                     x["attention_mask"])[:, 0]
        assert torch.equal(r.positions.window(0, len(r.ids)), want), name


def test_one_vision_tower_call_for_every_image_of_a_step(plain, monkeypatch):
    _, _, engine = plain
    calls = []
    real = _hf_compat.vision_features

    def counted(model, pixels, grid):
        calls.append(grid.shape[0])
        return real(model, pixels, grid)

    monkeypatch.setattr(_hf_compat, "vision_features", counted)
    before = engine.stats()["vision_encoder_images"]
    fresh = [rand_image(56 + 28 * k, 84, 40 + k) for k in range(6)]  # seen by no encoder cache yet
    engine.generate([fresh[:2], fresh[2], fresh[3:]], ["<image><image>A?", "B?", "C <image> <image> <image>"], 3)
    assert calls == [6]
    assert engine.stats()["vision_encoder_images"] - before == 6


# ----------------------------------------------------------------------------- perception


PERCEPTIONS = [("region", region(([2, 4], [5, 6]))), ("region", region(([1], [1]), ([6, 7], [0, 2]))),
               ("clip", action("clip")), ("dino", action("dino")), ("sam", action("sam"))]


@pytest.mark.parametrize("variant,script", PERCEPTIONS, ids=["region-1", "region-2", "clip", "dino", "sam"])
def test_perception_looks_at_the_first_image(tiny_bundle, variant, script):
    """Two and three images, the perceived one first in the conversation but not in the last turn:
    the engine equals the reference pipeline (which crops and re-encodes the same image), and
    the crops are cut from the first image (its size, not the others')."""
    b = tiny_bundle(variant)
    first, second, third = rand_image(196, 112, 11), rand_image(84, 168, 12), rand_image(112, 112, 13)
    prompts = [Conversation((("user", "<image>\nRemember this."), ("assistant", "Done."),
                             ("user", "Now <image>: what differs?"))),
               "<image> <image> <image> Which one?"]
    images = [[first, second], [first, third, second]]
    forced = [toks(b.tokenizer, script)] * 2
    ref = two_round_generate(b, images, prompts, 8, forced, return_logits=True)
    eng = Engine(b).generate(images, prompts, 8, forced, return_logits=True)
    for prompt_images, rr, er in zip(images, ref, eng):
        assert rr.round2_prompt_ids is not None and er.round1_ids == rr.round1_ids
        assert er.answer_ids == rr.answer_ids and er.finish_reason == rr.finish_reason
        assert er.sequence_ids[: len(rr.round2_prompt_ids)] == rr.round2_prompt_ids
        logits = rr.round1_logits + rr.answer_logits
        assert max((x - y).abs().max().item() for x, y in zip(logits, er.logits)) <= 1e-4
        (trace,) = er.trace
        assert trace.kind == variant and trace.image == 0 and trace.to_json()["image"] == 0
        pad_runs = [len(m.group()) for m in re.finditer(r"I+", "".join(
            "I" if t == b.vocab.image_pad else "." for t in rr.round2_prompt_ids))]
        prompt_runs = len(prompt_images)
        if variant == "region":
            blocks = spec.parse_perception(rr.round1_ids[:-1], b.vocab).blocks
            assert trace.boxes == rr.boxes == [spec.block_box(block, *first.size) for block in blocks]
            crops = [b.processor.token_count(b.processor.prepare_crop(first, box)) for box in trace.boxes]
            assert pad_runs[prompt_runs:] == crops
        else:
            assert trace.boxes == [(0, 0, *first.size)] and len(pad_runs) == prompt_runs


def test_a_later_perception_round_crops_the_first_image_again(tiny_bundle):
    b = tiny_bundle("region")
    first, second = rand_image(140, 84, 21), rand_image(84, 84, 22)
    script = toks(b.tokenizer, region(([3], [3])))
    (r,) = Engine(b).generate([[first, second]], ["<image> or <image>?"], 12, [script], max_perception_rounds=2)
    assert all(t.image == 0 and t.boxes[0][2] <= first.size[0] for t in r.trace)


# ----------------------------------------------------------------------------- errors


def png_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_one_unreadable_image_of_three_ends_that_request_alone(plain, expected, tmp_path):
    _, _, engine = plain
    two = CONVERSATIONS["two images"]
    out = engine.generate([[IMAGES[0], tmp_path / "missing.png", IMAGES[1]], images_of(two), None],
                          ["<image> <image> <image>", as_conversation(two), "Tell me a story."], MAX_NEW)
    assert out[0].finish_reason == "error" and re.fullmatch(r"request \d+: image 1: image file not found: .*missing\.png",
                                                            out[0].error), out[0].error
    assert out[1].token_ids == expected["two images"] and out[2].token_ids == expected["text only"]
    broken = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url(IMAGES[k])}}
                                           for k in range(2)] + [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, text_part("Q")]}]
    bad, good = engine.chat([broken, two], vpt_fast.SamplingParams(max_new_tokens=MAX_NEW))
    assert bad.finish_reason == "error" and bad.error.startswith("conversation 0: image 2: the data: URL is not")
    assert good.token_ids == expected["two images"]
    mismatch, = engine.generate([[IMAGES[0], IMAGES[1]]], ["only <image> here"], 3)
    assert "the prompt places 1 image(s) with '<image>' but 2 image(s) were given" in mismatch.error


def test_bad_images_in_the_patched_generate_name_the_image(plain):
    model, inputs, _ = plain
    x = inputs.apply_chat_template([CONVERSATIONS["two images"], CONVERSATIONS["one image"]], tokenize=True,
                                   add_generation_prompt=True, return_dict=True, return_tensors="pt", padding=True)
    vpt_fast.accelerate(model, inputs.tokenizer)
    try:
        with pytest.raises(ValueError, match=r"vpt_images gives 1 image\(s\) for sample 0, which holds 2"):
            model.generate(**x, max_new_tokens=3, vpt_images=[IMAGES[0], None])
        with pytest.raises(ValueError, match=r"image_grid_thw of shape \(2, 3\) for 3 image"):
            model.generate(**{**x, "image_grid_thw": x["image_grid_thw"][:2]}, max_new_tokens=3)
        grids = x["image_grid_thw"][[1, 0, 2]]  # the first two images' grids swapped
        with pytest.raises(ValueError, match="image pad tokens where image 0 has"):
            model.generate(**{**x, "image_grid_thw": grids}, max_new_tokens=3)
        model.generate(**x, max_new_tokens=3, vpt_images=[[None, IMAGES[1]], [IMAGES[4]]])  # originals, some
    finally:
        vpt_fast.restore(model)


# ----------------------------------------------------------------------------- the prefix cache


def test_prefix_cache_keys_each_block_by_its_own_image(tiny_bundle):
    """Blocks holding image k's tokens carry image k's key: a request with the same first image
    but another second one (of the same size) finds the blocks before the second image only;
    the same two images find the blocks past both; the same two swapped find none past the
    system prompt. Every answer equals an engine with the cache off."""
    b = tiny_bundle("region")
    one, two, other = rand_image(112, 84, 31), rand_image(84, 84, 32), rand_image(84, 84, 33)
    question = "<image> then <image>: tell them apart, please, in a few words."
    cases = [([one, two], question), ([one, other], question), ([one, two], question + " Briefly."),
             ([two, one], question)]
    cached = Engine(b, block_size=4)
    off = Engine(b, block_size=4, enable_prefix_caching=False)
    bs, pad = 4, b.vocab.image_pad
    hits = []
    for images, prompt in cases:
        before = cached.stats()["prefix_cache_hits"]
        (got,) = cached.generate([images], [prompt], 6)
        (want,) = off.generate([images], [prompt], 6)
        assert got.token_ids == want.token_ids
        hits.append(cached.stats()["prefix_cache_hits"] - before)
    ids = cached.prepare([one, two], question).ids
    starts = [i for i, t in enumerate(ids) if t == pad and ids[i - 1] != pad]
    second_end = max(i for i, t in enumerate(ids) if t == pad) + 1
    assert hits[0] == 0
    assert hits[1] == starts[1] // bs * bs  # up to the block where the second image begins
    assert hits[2] >= second_end // bs * bs  # past both images
    assert hits[3] == starts[0] // bs * bs  # the first image differs: the system prompt only


def test_patched_generate_on_a_vpt_model_with_several_images(tiny_ckpt, tiny_bundle):
    """A VPT checkpoint's patched generate on a batch of 2, 1 and 0 images: the new tokens are the
    two-round reference's conversation (its crops cut from each sample's first image)."""
    bundle = tiny_bundle("region")
    inputs = HFInputs(tiny_ckpt("region"))
    pictures = [rand_image(112, 84, 51), rand_image(56, 84, 52), rand_image(84, 84, 53)]
    convs = [[{"role": "user", "content": [{"type": "image", "image": pictures[0]}, text_part(" vs "),
                                           {"type": "image", "image": pictures[1]}, text_part("?")]}],
             [{"role": "user", "content": [{"type": "image", "image": pictures[2]}, text_part("Where?")]}],
             [{"role": "user", "content": [text_part("Say something.")]}]]
    script = [region(([1, 3], [0, 2])), region(([5], [6])), None]
    forced = [toks(bundle.tokenizer, s) if s else None for s in script]
    reference = two_round_generate(bundle, [images_of(c) for c in convs], [as_conversation(c) for c in convs], 8,
                                   forced)
    x = inputs.apply_chat_template(convs, tokenize=True, add_generation_prompt=True, return_dict=True,
                                   return_tensors="pt", padding=True)
    vpt_fast.accelerate(bundle.model, inputs.tokenizer)
    try:
        got = bundle.model.generate(**x, max_new_tokens=8, vpt_force=forced)
        results = vpt_fast.last_results(bundle.model)
    finally:
        vpt_fast.restore(bundle.model)
    length = x["input_ids"].shape[1]
    for b, ref in enumerate(reference):
        whole = (ref.round2_prompt_ids + ref.answer_ids) if ref.round2_prompt_ids else ref.round1_prompt_ids + ref.round1_ids
        new = whole[len(ref.round1_prompt_ids):]
        assert got[b, length: length + len(new)].tolist() == new, b
        assert [t.boxes for t in results[b].trace] == ([ref.boxes] if ref.boxes else [])
    assert results[0].trace[0].image == 0
    assert results[0].trace[0].boxes == [spec.block_box(blk, *pictures[0].size)
                                         for blk in results[0].perception.blocks]
