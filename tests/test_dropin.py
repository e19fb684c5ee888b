"""`vpt_fast.accelerate(model, processor)`: the patched `model.generate(**inputs)` returns what
transformers' own generate returns (token for token with greedy decoding, on a stock
Qwen2-VL), the two-round conversation on a VPT model, and hands what it cannot honour to
transformers' generate with a warning. `Engine.chat` answers chat messages."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from hf_inputs import HFInputs, stock_generate
from vpt_cases import rand_image, region, toks

import vpt_fast
from vpt_fast import spec
from vpt_fast.engine import Engine
from vpt_fast.reference import two_round_generate

REPO = Path(__file__).resolve().parents[1]
QWEN = "transformers.models.qwen2_vl.modeling_qwen2_vl.Qwen2VLForConditionalGeneration"


@pytest.fixture(scope="module")
def plain(tiny_ckpt):
    """(a stock Qwen2-VL loaded by transformers, HFInputs for it)."""
    from transformers import Qwen2VLForConditionalGeneration

    folder = tiny_ckpt("plain")
    return Qwen2VLForConditionalGeneration.from_pretrained(folder).eval(), HFInputs(folder)


@pytest.fixture
def patched(plain):
    model, inputs = plain
    vpt_fast.accelerate(model, inputs.tokenizer, max_batch_size=4)
    yield model, inputs
    vpt_fast.restore(model)


IMAGES = [rand_image(84, 56, 1), rand_image(56, 112, 2), rand_image(112, 84, 3)]


def conversation(k: int, with_image: bool):
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": f"Question number {k}?"}]
    return [{"role": "user", "content": content}]


def batch(inputs, side="left"):
    """Three samples: two images of different sizes and a text-only one between them."""
    convs = [conversation(0, True), conversation(1, False), conversation(2, True)]
    return inputs.chat(convs, [IMAGES[0], IMAGES[1]], padding_side=side)


def test_left_padded_batch_equals_transformers(patched):
    model, inputs = patched
    x = batch(inputs, "left")
    assert bool((x["attention_mask"] == 0).any())  # really padded
    want = stock_generate(model, **x, max_new_tokens=12)
    got = model.generate(**x, max_new_tokens=12)
    assert torch.equal(got, want)
    results = vpt_fast.last_results(model)
    assert len(results) == 3 and all(r.trace == [] for r in results)
    new = [row[x["input_ids"].shape[1]:] for row in got]
    assert [r.token_ids for r in results] == [row[: len(r.token_ids)].tolist() for r, row in zip(results, new)]


def test_right_padding_gives_each_prompt_its_own_answer(patched):
    model, inputs = patched
    x = batch(inputs, "right")
    got = model.generate(**x, max_new_tokens=10)
    length = x["input_ids"].shape[1]
    assert torch.equal(got[:, :length], x["input_ids"])  # the prompt as given, padding included
    alone = [inputs.chat([conversation(0, True)], [IMAGES[0]]), inputs.chat([conversation(1, False)]),
             inputs.chat([conversation(2, True)], [IMAGES[1]])]
    for row, one in zip(got, alone):
        want = stock_generate(model, **one, max_new_tokens=10)[0, one["input_ids"].shape[1]:]
        assert row[length : length + len(want)].tolist() == want.tolist()


def test_tokenizer_chat_template_inputs_and_generation_options(patched):
    from transformers import GenerationConfig

    model, inputs = patched
    tok = inputs.tokenizer
    tok.padding_side = "left"
    convs = [conversation(k, False) for k in range(3)]
    x = dict(tok.apply_chat_template(convs, tokenize=True, add_generation_prompt=True, return_dict=True,
                                     return_tensors="pt", padding=True))
    for options in ({"max_new_tokens": 9}, {"max_length": x["input_ids"].shape[1] + 7},
                    {"max_new_tokens": 9, "repetition_penalty": 1.4},
                    {"generation_config": GenerationConfig(max_new_tokens=6, eos_token_id=[model.generation_config.eos_token_id[0]],
                                                           pad_token_id=5)},
                    {"max_new_tokens": 8, "do_sample": True, "top_k": 1}):
        want = stock_generate(model, **x, **options)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning
            got = model.generate(**x, **options)
        assert torch.equal(got, want), options
    out = model.generate(**x, max_new_tokens=5, return_dict_in_generate=True)
    assert type(out).__name__ == "GenerateDecoderOnlyOutput" and out.scores is None
    assert torch.equal(out.sequences, stock_generate(model, **x, max_new_tokens=5))
    assert [r.text for r in out.vpt_results] == [r.text for r in vpt_fast.last_results(model)]


def test_sampling_is_seeded_by_torch(patched):
    model, inputs = patched
    x = batch(inputs)
    draw = lambda: model.generate(**x, max_new_tokens=8, do_sample=True, temperature=1.5, top_k=20, top_p=0.9)
    torch.manual_seed(3)
    first = draw()
    torch.manual_seed(3)
    assert torch.equal(draw(), first)
    greedy = model.generate(**x, max_new_tokens=8)
    assert not torch.equal(first, greedy)  # it does sample


def test_a_streamer_sees_the_prompt_then_each_new_token(patched):
    model, inputs = patched
    x = inputs.chat([conversation(0, True)], [IMAGES[2]])

    class Collect:
        def __init__(self):
            self.parts, self.ended = [], False

        def put(self, value):
            self.parts.append(value.tolist())

        def end(self):
            self.ended = True

    ours, theirs = Collect(), Collect()
    got = model.generate(**x, max_new_tokens=6, streamer=ours)
    stock_generate(model, **x, max_new_tokens=6, streamer=theirs)
    assert ours.ended and theirs.ended and ours.parts == theirs.parts
    assert sum(ours.parts[1:], []) == got[0, x["input_ids"].shape[1]:].tolist()


class Penalize:  # a logits processor of the user's own
    def __call__(self, input_ids, scores):
        scores[:, 7] += 100.0
        return scores


@pytest.mark.parametrize("options,why", [
    ({"num_beams": 2}, "num_beams=2"),
    ({"no_repeat_ngram_size": 2}, "no_repeat_ngram_size=2"),
    ({"min_new_tokens": 5}, "min_new_tokens=5"),
    ({"output_scores": True, "return_dict_in_generate": True}, "output_scores=True for 3 sequence"),
    ({"logits_processor": "custom"}, "logits_processor is given"),
    ({"stopping_criteria": "custom"}, "stopping_criteria is given"),
])
def test_what_the_engine_cannot_honour_goes_to_transformers(plain, options, why):
    from transformers import LogitsProcessorList, StoppingCriteriaList
    from transformers.generation.stopping_criteria import MaxLengthCriteria

    model, inputs = plain
    x = batch(inputs)
    options = dict(options)
    if options.get("logits_processor") == "custom":
        options["logits_processor"] = LogitsProcessorList([Penalize()])
    if options.get("stopping_criteria") == "custom":
        options["stopping_criteria"] = StoppingCriteriaList([MaxLengthCriteria(x["input_ids"].shape[1] + 3)])
    want = stock_generate(model, **x, max_new_tokens=6, **options)
    vpt_fast.accelerate(model, inputs.tokenizer)
    try:
        with pytest.warns(UserWarning, match=f"runs transformers' own generate for this call: .*{why}") as caught:
            got = model.generate(**x, max_new_tokens=6, **options)
        assert len([w for w in caught if "vpt_fast" in str(w.message)]) == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per reason
            again = model.generate(**x, max_new_tokens=6, **options)
        for out in (got, again):
            sequences = out.sequences if hasattr(out, "sequences") else out
            assert torch.equal(sequences, want.sequences if hasattr(want, "sequences") else want)
        assert vpt_fast.last_results(model) == []
        vpt_fast.accelerate(model, inputs.tokenizer, strict=True)
        with pytest.raises(ValueError, match=f"cannot run this call on the engine: .*{why}"):
            model.generate(**x, max_new_tokens=6, **options)
    finally:
        vpt_fast.restore(model)


def test_patching_one_instance_leaves_the_class_and_other_instances_alone(tiny_ckpt):
    from transformers import Qwen2VLForConditionalGeneration

    folder = tiny_ckpt("plain")
    one = Qwen2VLForConditionalGeneration.from_pretrained(folder)
    two = Qwen2VLForConditionalGeneration.from_pretrained(folder)
    stock = Qwen2VLForConditionalGeneration.generate
    inputs = HFInputs(folder)
    engine = vpt_fast.accelerate(one, inputs.tokenizer)
    assert isinstance(engine, Engine)
    assert one.generate.__func__ is not stock and two.generate.__func__ is stock
    assert Qwen2VLForConditionalGeneration.generate is stock and "generate" not in two.__dict__
    vpt_fast.accelerate(one, inputs.tokenizer)  # again: replaces the first patch
    assert vpt_fast.restore(one) is one
    assert one.generate.__func__ is stock and "generate" not in one.__dict__
    assert vpt_fast.restore(two) is two and two.generate.__func__ is stock
    with pytest.raises(ValueError, match="not patched"):
        vpt_fast.last_results(one)
    # a generate the instance had of its own is put back as it was
    own = one.generate
    one.generate = own
    vpt_fast.accelerate(one, inputs.tokenizer)
    vpt_fast.restore(one)
    assert one.__dict__["generate"] is own


def test_bad_inputs_raise_clearly(patched):
    model, inputs = patched
    x = batch(inputs)
    with pytest.raises(ValueError, match="pixel_values / image_grid_thw are missing"):
        model.generate(input_ids=x["input_ids"], attention_mask=x["attention_mask"], max_new_tokens=3)
    with pytest.raises(ValueError, match=r"image_grid_thw of shape \(1, 3\) for 2 image"):
        model.generate(**{**x, "image_grid_thw": x["image_grid_thw"][:1]}, max_new_tokens=3)
    with pytest.raises(ValueError, match="image pad tokens where the image has"):
        model.generate(**{**x, "image_grid_thw": x["image_grid_thw"].flip(0)}, max_new_tokens=3)
    with pytest.raises(ValueError, match="vpt_images must be a list with one entry per sample"):
        model.generate(**x, max_new_tokens=3, vpt_images=[IMAGES[0]])
    with pytest.raises(ValueError, match=r"vpt_images gives 1 image\(s\) for sample 1, which holds 0"):
        model.generate(**x, max_new_tokens=3, vpt_images=[IMAGES[0], IMAGES[1], IMAGES[1]])
    text_only = inputs.chat([conversation(1, False)])
    with pytest.raises(ValueError, match="pixel_values given, but no sample holds image pad tokens"):
        model.generate(**text_only, pixel_values=x["pixel_values"], max_new_tokens=3)
    holes = x["attention_mask"].clone()
    holes[0, -3] = 0
    with pytest.warns(UserWarning, match="an attention mask with holes"):
        model.generate(**{**x, "attention_mask": holes}, max_new_tokens=3)


# ----------------------------------------------------------------------------- a VPT checkpoint


def vpt_inputs(tiny_ckpt, variant="region"):
    return HFInputs(tiny_ckpt(variant))


def test_vpt_model_returns_the_two_round_conversation(tiny_ckpt, tiny_bundle):
    bundle = tiny_bundle("region")
    inputs = vpt_inputs(tiny_ckpt)
    script = [region(([1, 3], [0, 2])), region(([5], [6]), ([0, 1], [1])), None]
    images = [IMAGES[0], IMAGES[2], None]
    texts = ["What is on the left?", "Where is the car?", "Say something."]
    convs = [conversation(0, True), conversation(1, True), conversation(2, False)]
    for conv, text in zip(convs, texts):
        conv[0]["content"][-1]["text"] = text
    x = inputs.chat(convs, [IMAGES[0], IMAGES[2]])
    forced = [toks(bundle.tokenizer, s) if s else None for s in script]
    reference = two_round_generate(bundle, images, [("<image>" if im else "") + t for im, t in zip(images, texts)],
                                   8, forced)
    vpt_fast.accelerate(bundle.model, inputs.tokenizer)
    try:
        got = bundle.model.generate(**x, max_new_tokens=8, vpt_force=forced)
        results = vpt_fast.last_results(bundle.model)
        bigger = bundle.model.generate(**x, max_new_tokens=8, vpt_force=forced,
                                       vpt_images=[IMAGES[0].resize((168, 112)), IMAGES[2].resize((224, 168)), None])
        boxes_of_bigger = [r.trace[0].boxes if r.trace else [] for r in vpt_fast.last_results(bundle.model)]
    finally:
        vpt_fast.restore(bundle.model)
    length = x["input_ids"].shape[1]
    pad = bundle.model.generation_config.pad_token_id
    for b, ref in enumerate(reference):
        conversation_ids = (ref.round2_prompt_ids + ref.answer_ids) if ref.round2_prompt_ids else \
            (ref.round1_prompt_ids + ref.round1_ids)
        prompt_len = len(ref.round1_prompt_ids)
        row = got[b].tolist()
        assert row[length - prompt_len : length] == ref.round1_prompt_ids
        tail = row[length:]
        assert tail[: len(conversation_ids) - prompt_len] == conversation_ids[prompt_len:]
        assert all(t == pad for t in tail[len(conversation_ids) - prompt_len :])
        assert [t.boxes for t in results[b].trace] == ([ref.boxes] if ref.boxes else [])
        assert results[b].text == ref.text
    assert [len(r.trace) for r in results] == [1, 1, 0]
    # crops of the originals given: the boxes are in their (doubled) pixels
    assert boxes_of_bigger[0] == [spec.block_box(block, 168, 112) for block in results[0].perception.blocks]
    assert boxes_of_bigger[0] != results[0].trace[0].boxes
    unpadded = lambda row: row[: max(i for i, t in enumerate(row.tolist()) if t != pad) + 1]  # noqa: E731
    assert torch.equal(unpadded(bigger[2]), unpadded(got[2]))  # no image: the originals change nothing
    prompt_end = length + len(results[0].round1_ids) + 1  # the prompt and the scripted round 1 are the same
    assert torch.equal(bigger[:2, :prompt_end], got[:2, :prompt_end])


def test_a_raw_prompt_on_a_vpt_model_runs_until_it_asks_to_look(tiny_ckpt, tiny_bundle):
    bundle = tiny_bundle("region")
    inputs = vpt_inputs(tiny_ckpt)
    x = inputs(["<|vision_start|><|image_pad|><|vision_end|>Describe."], [IMAGES[0]])
    vpt_fast.accelerate(bundle.model, inputs.tokenizer)
    try:
        plainly = bundle.model.generate(**x, max_new_tokens=6)
        (r,) = vpt_fast.last_results(bundle.model)
        assert r.trace == []
        assert torch.equal(plainly, stock_generate(bundle.model, **x, max_new_tokens=6))  # transformers' tokens
        with pytest.raises(ValueError, match="not a chat conversation"):
            bundle.model.generate(**x, max_new_tokens=6, vpt_force=region(([1], [1])))
    finally:
        vpt_fast.restore(bundle.model)


def readme_example() -> str:
    """The README's drop-in example, as it is printed there."""
    text = (REPO / "README.md").read_text()
    start = text.index("One line makes transformers' `generate` run on the engine:")
    block = text[text.index("```python\n", start) + len("```python\n"):]
    return block[: block.index("```")]


def test_the_readme_example_runs_as_written(tiny_ckpt):
    """The README's example, run line for line on the tiny stock Qwen2-VL (float32, CPU): the
    path becomes the tiny checkpoint, the processor the stand-in of hf_inputs (transformers
    cannot build Qwen2VLProcessor without torchvision), and the output is transformers' own."""
    from transformers import Qwen2VLForConditionalGeneration

    folder = str(tiny_ckpt("plain"))
    code = readme_example()
    for old, new in (('"/path/to/Qwen2-VL-2B-Instruct"', "FOLDER"), ('dtype="bfloat16").cuda()', 'dtype="float32")'),
                     ('.to("cuda")', '.to("cpu")'), ("AutoProcessor.from_pretrained(FOLDER)", "HFInputs(FOLDER)"),
                     ("\nvpt_fast.last_results(model)", "\nresults = vpt_fast.last_results(model)")):
        assert old in code, f"the README example no longer holds {old!r}"
        code = code.replace(old, new)
    messages = [[{"role": "user", "content": [{"type": "image", "image": IMAGES[0]}, {"type": "text", "text": "Hi?"}]}],
                [{"role": "user", "content": [{"type": "text", "text": "Hello?"}]}]]
    scope = {"FOLDER": folder, "HFInputs": HFInputs, "messages": messages}
    exec(compile(code, "README.md", "exec"), scope)
    model, inputs, out, results = scope["model"], scope["inputs"], scope["out"], scope["results"]
    assert "generate" not in model.__dict__  # restored at the end
    fresh = Qwen2VLForConditionalGeneration.from_pretrained(folder).eval()
    width = inputs["input_ids"].shape[1]
    for i, conv in enumerate(messages):  # the tokenizer pads on the right: each row as its prompt alone
        alone = HFInputs(folder).chat([conv], [IMAGES[0]] if i == 0 else None)
        want = stock_generate(fresh, **alone, max_new_tokens=64)[0, alone["input_ids"].shape[1]:].tolist()
        assert out[i, width: width + len(want)].tolist() == want, f"sample {i}"
        assert results[i].token_ids == want[: len(results[i].token_ids)]


@pytest.mark.gpu
def test_left_padded_batch_equals_transformers_on_gpu(tiny_ckpt):
    from transformers import Qwen2VLForConditionalGeneration

    folder = tiny_ckpt("plain")
    model = Qwen2VLForConditionalGeneration.from_pretrained(folder).to("cuda").eval()
    inputs = HFInputs(folder)
    x = {k: v.to("cuda") for k, v in batch(inputs, "left").items()}
    want = stock_generate(model, **x, max_new_tokens=12)
    vpt_fast.accelerate(model, inputs.tokenizer)
    try:
        got = model.generate(**x, max_new_tokens=12)
    finally:
        vpt_fast.restore(model)
    assert got.device == want.device and torch.equal(got, want)


# ----------------------------------------------------------------------------- Engine.chat


def test_engine_chat_single_batched_and_multi_turn(tiny_bundle, plain):
    model, inputs = plain
    engine = Engine(tiny_bundle("plain"))
    first = [{"role": "system", "content": "Answer briefly."},
             {"role": "user", "content": [{"type": "image", "image": IMAGES[1]}, {"type": "text", "text": "What?"}]},
             {"role": "assistant", "content": "A car."},
             {"role": "user", "content": "What color is it?"}]
    second = [{"role": "user", "content": "Just text."}]
    broken = [{"role": "user", "content": [{"type": "image"}]}]
    params = vpt_fast.SamplingParams(max_new_tokens=6)
    one = engine.chat(first, params)
    many = engine.chat([first, broken, second], params)
    assert many[0].token_ids == one.token_ids and many[1].finish_reason == "error" and "image" in many[1].error
    # the same conversations through transformers' generate on the same weights
    as_template = [dict(m, content=[{"type": "image"}, {"type": "text", "text": "What?"}]) if k == 1 else m
                   for k, m in enumerate(first)]
    x = inputs.chat([as_template, second], [IMAGES[1]])
    want = stock_generate(model, **x, max_new_tokens=6, eos_token_id=engine.bundle.vocab.im_end)
    length = x["input_ids"].shape[1]
    for row, r in zip(want, (many[0], many[2])):
        assert row[length : length + len(r.token_ids)].tolist() == r.token_ids
        assert len(r.token_ids) == 6 or r.token_ids[-1] == engine.bundle.vocab.im_end
    vpt = Engine(tiny_bundle("region"))
    (looked,) = vpt.chat([first], forced_tokens=[toks(vpt.bundle.tokenizer, region(([2], [3])))])
    assert looked.trace and looked.trace[0].kind == "region"
    reference = two_round_generate(vpt.bundle, [IMAGES[1]], [vpt_fast.chat.from_messages(first)[1]], 64,
                                   [toks(vpt.bundle.tokenizer, region(([2], [3])))])
    assert looked.sequence_ids == reference[0].round2_prompt_ids + reference[0].answer_ids


def test_scores_logits_and_stop_strings_equal_transformers(patched):
    """One sequence of the stock model: output_scores and output_logits equal transformers' own
    (greedy with a repetition penalty, and sampled with temperature, top-k and top-p: the
    scores of the engine's tokens through the same processors), and stop_strings end the
    sequence where transformers' does."""
    model, inputs = patched
    x = inputs.chat([conversation(0, True)], [IMAGES[0]])
    length = x["input_ids"].shape[1]
    options = dict(max_new_tokens=10, repetition_penalty=1.3, return_dict_in_generate=True, output_scores=True,
                   output_logits=True)
    want = stock_generate(model, **x, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        got = model.generate(**x, **options)
    assert torch.equal(got.sequences, want.sequences)
    for name in ("scores", "logits"):
        assert len(getattr(got, name)) == len(getattr(want, name))
        worst = max((a - b).abs().max().item() for a, b in zip(getattr(got, name), getattr(want, name)))
        assert worst <= 1e-4, (name, worst)
    sampled = model.generate(**x, max_new_tokens=6, do_sample=True, temperature=0.8, top_k=30, top_p=0.9,
                             return_dict_in_generate=True, output_scores=True, output_logits=True)
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    for i, (s, l) in enumerate(zip(sampled.scores, sampled.logits)):
        ref = l.clone()
        for proc in (TemperatureLogitsWarper(0.8), TopKLogitsWarper(30), TopPLogitsWarper(0.9)):
            ref = proc(sampled.sequences[:, : length + i], ref)
        assert torch.equal(torch.isinf(s), torch.isinf(ref)) and torch.allclose(s[~torch.isinf(s)], ref[~torch.isinf(ref)])
        assert not torch.isinf(s[0, sampled.sequences[0, length + i]])  # the token drawn was allowed
    tok = inputs.tokenizer
    plain = stock_generate(model, **x, max_new_tokens=16)[0, length:]
    text = tok.decode(plain, skip_special_tokens=True)
    stop = next(text[i : i + 3] for i in range(4, len(text) - 3) if "\ufffd" not in text[i : i + 3])
    want = stock_generate(model, **x, max_new_tokens=16, stop_strings=[stop], tokenizer=tok)
    got = model.generate(**x, max_new_tokens=16, stop_strings=[stop], tokenizer=tok)
    assert torch.equal(got, want) and got.shape[1] < length + 16
    with pytest.raises(ValueError, match="stop_strings need the tokenizer"):
        model.generate(**x, max_new_tokens=4, stop_strings=["x"])


def test_num_return_sequences_with_sampling(patched):
    """num_return_sequences=3: three rows per sample, in transformers' order (a sample's rows
    together), each starting with its prompt; torch's seed repeats them; a sample's first row is
    the row num_return_sequences=1 gives with the same torch seed; rows of a sample differ."""
    model, inputs = patched
    x = batch(inputs)
    length = x["input_ids"].shape[1]
    draw = lambda k: model.generate(**x, max_new_tokens=8, do_sample=True, temperature=1.5, num_return_sequences=k)
    torch.manual_seed(5)
    three = draw(3)
    torch.manual_seed(5)
    assert torch.equal(draw(3), three) and len(vpt_fast.last_results(model)) == 9
    torch.manual_seed(5)
    one = draw(1)
    assert three.shape[0] == 9 and torch.equal(three[:, :length], x["input_ids"].repeat_interleave(3, dim=0))
    for b in range(3):
        width = min(one.shape[1], three.shape[1])
        assert torch.equal(three[3 * b, :width], one[b, :width])
        assert len({tuple(three[3 * b + k].tolist()) for k in range(3)}) > 1
