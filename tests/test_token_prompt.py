"""Prompts given as token ids and images given as patch rows (what the drop-in `generate`
feeds the engine), stop tokens and the repetition penalty."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vpt_cases import rand_image, region, toks

from vpt_fast import SamplingParams, spec
from vpt_fast.engine import Engine
from vpt_fast.preprocess import PixelImage, qwen_image_inputs, rows_to_picture
from vpt_fast.prompt import TokenPrompt, conversation, encode, parse_conversation, vision_span
from vpt_fast.sampling import penalize_repetition


def run(engine, image, prompt, params, forced=None):
    (event,) = [e for e in engine._batch([(image, prompt, params, forced)]) if hasattr(e, "result")]
    return event.result


def test_patch_rows_give_back_their_picture(tiny_bundle):
    cfg = tiny_bundle("region").processor.qwen
    for w, h in ((84, 56), (56, 112), (140, 84)):
        image = rand_image(w, h, w)
        rows, grid = qwen_image_inputs([image], cfg)
        assert np.array_equal(np.asarray(rows_to_picture(rows, tuple(grid[0, 1:].tolist()), cfg)), np.asarray(image))
        px = PixelImage.from_rows(rows, grid[0].tolist(), cfg)
        assert px.grid == tuple(grid[0].tolist()) and px.picture.size == (w, h)
    with pytest.raises(ValueError, match="pixel_values rows of shape"):
        PixelImage.from_rows(rows[:-1], grid[0].tolist(), cfg)
    with pytest.raises(ValueError, match="not a still image's grid"):
        PixelImage.from_rows(rows, [2, *grid[0, 1:].tolist()], cfg)


def test_a_token_prompt_runs_as_its_conversation_does(tiny_bundle):
    bundle = tiny_bundle("region")
    engine = Engine(bundle)
    image = rand_image(84, 56, 9)
    params = SamplingParams(max_new_tokens=8)
    forced = toks(bundle.tokenizer, region(([1, 2], [3])))
    want = run(engine, image, "<image>Where is it?", params, forced)
    n = bundle.processor.token_count(bundle.processor.prepare(image))
    ids = encode(bundle.tokenizer, conversation([("user", vision_span(spec.IMAGE_PAD, n) + "Where is it?")]))
    assert parse_conversation(bundle.tokenizer, ids) == (spec.SYSTEM_PROMPT, (("user", vision_span(spec.IMAGE_PAD, n)
                                                                                  + "Where is it?"),))
    rows, grid = qwen_image_inputs([bundle.processor.prepare(image)], bundle.processor.qwen)
    for first in (image, PixelImage.from_rows(rows, grid[0].tolist(), bundle.processor.qwen, image)):
        got = run(engine, first, TokenPrompt(ids), params, forced)
        assert got.sequence_ids == want.sequence_ids and got.token_ids == want.token_ids
        assert [t.boxes for t in got.trace] == [t.boxes for t in want.trace] and got.trace
    # ids that are not a chat conversation run as they are, and cannot continue into a perception
    raw = encode(bundle.tokenizer, vision_span(spec.IMAGE_PAD, n) + "Describe it.")
    assert parse_conversation(bundle.tokenizer, raw) is None
    plain = run(engine, image, TokenPrompt(raw), params)
    assert plain.finish_reason in ("stop", "length") and plain.sequence_ids[: len(raw)] == raw
    looked = run(engine, image, TokenPrompt(raw), params, forced)
    assert looked.finish_reason == "error" and "not a chat conversation" in looked.error
    bad = run(engine, image, TokenPrompt(ids[:-3] + [10**6]), params)
    assert bad.finish_reason == "error" and "outside [0," in bad.error
    short = run(engine, image, TokenPrompt([t for t in ids if t != bundle.vocab.image_pad][:5] + [bundle.vocab.image_pad]),
                params)
    assert short.finish_reason == "error" and "1 image pad tokens where the image has" in short.error


def test_stop_tokens_end_a_round(tiny_bundle):
    bundle = tiny_bundle("region")
    engine = Engine(bundle)
    stop = bundle.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    script = toks(bundle.tokenizer, "The answer") + [stop] + toks(bundle.tokenizer, " is red.")
    r = run(engine, None, "Question?", SamplingParams(max_new_tokens=12, stop_token_ids=(stop,)), script)
    assert r.finish_reason == "stop" and r.token_ids == script[: script.index(stop) + 1]
    assert r.sequence_ids[-1] == stop and r.text == "The answer"
    longer = run(engine, None, "Question?", SamplingParams(max_new_tokens=12), script)
    assert len(longer.token_ids) > len(r.token_ids)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=("x",))
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=0)


def test_repetition_penalty_is_transformers_rule():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(1, 50, generator=g)
    seen = torch.tensor([3, 7, 7, 0, 49, 12])
    for penalty in (1.3, 0.8):
        want = RepetitionPenaltyLogitsProcessor(penalty)(seen[None], scores.clone())[0]
        assert torch.equal(penalize_repetition(scores[0].clone(), seen, penalty), want)


def test_encode_equals_the_tokenizer_and_threads_may_share_it(tiny_bundle):
    """prompt.encode goes through a private copy of the tokenizer's backend (any number of
    threads at once, Python's lock released): the ids are transformers' own, special-token text
    included, and threads encoding together get what each gets alone."""
    import random
    import threading

    from transformers import AutoTokenizer

    bundle = tiny_bundle("region")
    tok = bundle.tokenizer
    rng = random.Random(0)
    pieces = ["Hello", " world", "é", "😀", "\n", "  ", "<|im_end|>", "<|x_3|>", "<|image_pad|>", "region", "1234",
              "<|im_start|>user\n", "\t", "ß", "漢字"]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) for _ in range(200)]
    for text in texts:
        assert encode(tok, text) == tok(text, add_special_tokens=False)["input_ids"], text
    fresh = AutoTokenizer.from_pretrained(bundle.path, local_files_only=True)  # a tokenizer not yet seen
    assert encode(fresh, texts[5]) == fresh(texts[5], add_special_tokens=False)["input_ids"]
    want = [encode(tok, t * 50) for t in texts[:16]]
    got = [None] * 16

    def work(i):
        for _ in range(5):
            got[i] = encode(tok, texts[i] * 50)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
