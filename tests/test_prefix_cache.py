"""Prefix caching and the encoder cache: what was computed once is not computed again, and no
result changes. Every engine result with the caches on is compared with an engine that has
them off (`OFF`), run on the same requests in the same order: the same tokens, finish
reasons and traces, float32 logits within 1e-5."""

from __future__ import annotations

import base64
import io
import re

import pytest
import torch
from test_scheduler import finish_all
from vpt_cases import action, assert_same_result, rand_image, region, toks

from vpt_fast import SamplingParams
from vpt_fast.engine import Engine
from vpt_fast.engine.cache import PagedKVCache
from vpt_fast.media import MediaPolicy
from vpt_fast.prompt import Conversation

OFF = dict(enable_prefix_caching=False, encoder_cache_gib=0)
TOL = 1e-5
GREEDY = SamplingParams(max_new_tokens=10, return_logits=True)


def one_by_one(engine, jobs):
    """Each job (image, prompt, params, forced) run to its end before the next is added."""
    out = []
    for job in jobs:
        rid = engine.add_request(*job)
        out.append(finish_all(engine)[rid])
    return out


def together(engine, jobs):
    ids = [engine.add_request(*job) for job in jobs]
    results = finish_all(engine)
    return [results[i] for i in ids]


def assert_same(got, want, what=""):
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_same_result(g, w, tol=TOL, what=f"{what} request {i}")


def assert_nothing_held(engine):
    assert engine.kv_blocks_used == 0 and not engine.has_unfinished()
    assert all(engine.cache.holders(b) == 0 for b in range(engine.cache.num_blocks))


# ---------------------------------------------------------------------- the block pool


def test_blocks_are_shared_by_count_and_cached_ones_handed_out_last_least_recent_first():
    cache = PagedKVCache(1, 6, 4, 1, 2, torch.float32, "cpu")
    a = cache.allocate(3)
    cache.publish(a[0], b"h0")
    cache.publish(a[1], b"h1")
    cache.release(a)
    assert cache.num_free == 5 and cache.num_cached_free == 2 and cache.num_used == 0
    assert cache.find(b"h0") == a[0] and cache.find(b"h1") == a[1] and cache.find(b"h2") is None
    plain = cache.allocate(3)  # every block without a hash goes first
    assert not set(plain) & {a[0], a[1]} and cache.find(b"h0") == a[0] and cache.find(b"h1") == a[1]
    (evicted,) = cache.allocate(1)  # then the least recently released cached block: the tail a[1]
    assert evicted == a[1] and cache.find(b"h1") is None and cache.find(b"h0") == a[0]
    cache.share(a[0])  # found and taken back from the free ones
    assert cache.num_free == 0 and cache.holders(a[0]) == 1
    cache.share(a[0])
    cache.release([a[0]])
    assert cache.holders(a[0]) == 1 and cache.num_free == 0
    cache.publish(evicted, b"h0")  # those contents already have a block: this one stays private
    assert cache.find(b"h0") == a[0] and not cache.is_published(evicted)
    cache.unpublish(a[0])
    assert cache.find(b"h0") is None
    cache.release([a[0]])
    assert cache.num_cached_free == 0 and cache.holders(a[0]) == 0
    with pytest.raises(RuntimeError, match="released more times"):
        cache.release([a[0]])


# ---------------------------------------------------------------------- block hashes


def _hashes(engine, image, prompt):
    r = engine.prepare(image, prompt, GREEDY)
    assert r.error is None, r.error
    return r, engine.prefix_cache.hashes(r, len(r.ids) // engine.cache.block_size)


def test_block_hashes_name_an_image_by_its_pixels_not_by_how_it_came(tiny_bundle, tmp_path):
    engine = Engine(tiny_bundle("region"), block_size=8)
    picture = rand_image(300, 200, 1)
    path = tmp_path / "picture.png"
    picture.save(path)
    data = io.BytesIO()
    picture.save(data, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(data.getvalue()).decode()
    prompt = "<image>\nWhat is it?"
    r, by_path = _hashes(engine, path, prompt)
    assert _hashes(engine, picture, prompt)[1] == by_path
    assert _hashes(engine, MediaPolicy().load(url), prompt)[1] == by_path
    assert None not in by_path and len(set(by_path)) == len(by_path)
    # another picture of the same size: the blocks before its run are the same, every block from it on differs
    first = r.ids.index(engine.vocab.image_pad) // engine.cache.block_size
    other = _hashes(engine, rand_image(300, 200, 2), prompt)[1]
    assert other[:first] == by_path[:first] and all(o != h for o, h in zip(other[first:], by_path[first:]))
    # one token changed early changes every hash from its block on (the chain)
    r2 = engine.prepare(picture, "<image>\nWhat is this?", GREEDY)
    changed = next(i for i, (x, y) in enumerate(zip(r.ids, r2.ids)) if x != y) // engine.cache.block_size
    again = engine.prefix_cache.hashes(r2, len(r2.ids) // engine.cache.block_size)
    assert again[:changed] == by_path[:changed] and all(x != y for x, y in zip(again[changed:], by_path[changed:]))


def test_reencoding_blocks_and_all_after_are_never_shared(tiny_bundle):
    b = tiny_bundle("clip")
    engine = Engine(b, block_size=4)
    ids = toks(b.tokenizer, "<|im_start|>system\nHi<|im_end|>\n<|im_start|>user\nA<|im_end|>\n<|im_start|>assistant\n"
                            + action("clip", eos=False) + " and more text after it")
    from vpt_fast.prompt import TokenPrompt
    r = engine.prepare(None, TokenPrompt(ids), GREEDY)
    hashes = engine.prefix_cache.hashes(r, len(r.ids) // 4)
    barrier = min(i for i, t in enumerate(r.ids) if t == b.vocab.actions["clip"].action) // 4
    assert None not in hashes[:barrier] and set(hashes[barrier:]) == {None}


# ---------------------------------------------------------------------- results equal with the caches off


def test_many_questions_per_image(tiny_bundle):
    """Two images, four questions each: asked one after another, then all at once. The image
    and the prompt before each question are computed once per image."""
    b = tiny_bundle("region")
    questions = ["What color is it?", "How many are there?", "Where is the cat?", "Is it day or night?"]
    images = [rand_image(400, 300, 1), rand_image(300, 400, 2)]
    jobs = [(image, f"<image>\n{q}", GREEDY, None) for image in images for q in questions]
    engine, off = Engine(b, block_size=8), Engine(b, block_size=8, **OFF)
    assert_same(one_by_one(engine, jobs), one_by_one(off, jobs), "one by one")
    stats, off_stats = engine.stats(), off.stats()
    assert stats["prompt_tokens"] == off_stats["prompt_tokens"] == \
        stats["computed_prompt_tokens"] + stats["cached_prompt_tokens"]
    assert stats["cached_prompt_tokens"] >= 0.5 * stats["prompt_tokens"], stats
    assert stats["vision_encoder_images"] == 2 and off_stats["vision_encoder_images"] == 8
    assert off_stats["cached_prompt_tokens"] == off_stats["prefix_cache_queries"] == off_stats["vision_cache_queries"] == 0
    assert_nothing_held(engine)
    # all at once: the first question of each image is computed, the others wait a step for its blocks
    engine = Engine(b, block_size=8)
    assert_same(together(engine, jobs), together(off, jobs), "together")
    stats = engine.stats()
    assert stats["vision_encoder_images"] == 2 and stats["cached_prompt_tokens"] >= 0.5 * stats["prompt_tokens"], stats


def test_a_chat_turn_reuses_the_turn_before_but_its_last_partial_block(tiny_bundle):
    b = tiny_bundle("region")
    image = rand_image(280, 210, 3)
    answers = ["The cat is red.", "There are two of them.", "On the left."]
    questions = ["<image>\nWhat color is the cat?", "How many cats?", "Where are they?", "Why?"]
    engine, off = Engine(b, block_size=8), Engine(b, block_size=8, **OFF)
    turns, previous = [], None
    for k, question in enumerate(questions):
        turns.append(("user", question))
        forced = toks(b.tokenizer, answers[k] + "<|im_end|>") if k < len(answers) else None
        job = (image, Conversation(tuple(turns)), GREEDY, forced)
        before = engine.stats()["cached_prompt_tokens"]
        (got,) = one_by_one(engine, [job])
        assert_same([got], one_by_one(off, [job]), f"turn {k + 1}")
        prompt = got.sequence_ids[: got.prompt_tokens]
        if previous is not None:
            fed = previous.sequence_ids[:-1]  # the closing <|im_end|> is never fed
            assert prompt[: len(fed)] == fed  # this turn's prompt starts with everything the last one held
            assert engine.stats()["cached_prompt_tokens"] - before == len(fed) // 8 * 8
        previous = got
        if k < len(answers):
            assert got.text == answers[k]
            turns.append(("assistant", got.text))
    assert_nothing_held(engine)


@pytest.mark.parametrize("variant, scripts", [
    ("region", [region(([2, 4], [5, 6])), region(([0, 3], [1]), ([6], [2, 7]))]),
    ("clip", [action("clip"), region(([2], [3]))]),
    ("dino", [action("dino"), region(([5], [0, 1]))]),
    ("sam", [action("sam"), region(([0, 7], [3]))]),
])
def test_perceptions_asked_again(tiny_bundle, variant, scripts):
    """The same image asked other questions with the same perceptions: its crops and branch
    inputs come from the encoder cache; re-encodings are projected anew with each sequence's
    own control vector (a cached projection would change the answers)."""
    b = tiny_bundle(variant)
    image = rand_image(333, 217, 4)
    jobs = [(image, f"<image>\n{q}", GREEDY, toks(b.tokenizer, s)) for q in ("What is it?", "Which one?")
            for s in scripts]
    engine, off = Engine(b, block_size=8), Engine(b, block_size=8, **OFF)
    got = one_by_one(engine, jobs)
    assert_same(got, one_by_one(off, jobs), variant)
    assert all(r.trace for r in got)
    stats = engine.stats()
    assert stats["vision_cache_hits"] > 0 and stats["vision_encoder_images"] < off.stats()["vision_encoder_images"]
    assert stats["cached_prompt_tokens"] > 0
    assert_same(together(Engine(b, block_size=8), jobs), together(off, jobs), f"{variant} together")


def test_seeded_samples_with_the_caches(tiny_bundle):
    b = tiny_bundle("region")
    image = rand_image(250, 250, 5)
    params = [SamplingParams(max_new_tokens=12, do_sample=True, temperature=0.9, top_p=0.9, seed=s, return_logits=True)
              for s in (1, 2, 1)]
    jobs = [(image, "<image>\nTell me about it.", p, None) for p in params]
    engine, off = Engine(b, block_size=8), Engine(b, block_size=8, **OFF)
    got = one_by_one(engine, jobs)
    assert_same(got, one_by_one(off, jobs), "sampled")
    assert got[0].token_ids == got[2].token_ids and engine.stats()["cached_prompt_tokens"] > 0


def test_preemption_and_eviction_under_pressure(tiny_bundle):
    """A cache far too small for the working set: requests are preempted and recomputed (from
    blocks still cached when they are), cached blocks are evicted to make room; nothing
    changes, and every block is given back."""
    b = tiny_bundle("region")
    images = [rand_image(300, 220, s) for s in range(3)]
    scripts = [region(([1, 2], [3])), None, region(([0], [0, 1]), ([5], [6]))]
    jobs = [(images[i % 3], f"<image>\nQuestion {i}?", GREEDY, toks(b.tokenizer, scripts[i % 3]) if scripts[i % 3] else None)
            for i in range(9)]
    small = dict(kv_cache_tokens=330, block_size=8, max_batch_size=6)
    engine, off = Engine(b, **small), Engine(b, **small, **OFF)
    assert_same(together(engine, jobs), together(off, jobs), "under pressure")
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["prefix_cache_hits"] > 0, stats
    assert_nothing_held(engine)
    assert_same(one_by_one(engine, jobs[:4]), one_by_one(off, jobs[:4]), "after")


def test_abort_of_a_request_whose_blocks_others_share(tiny_bundle):
    b = tiny_bundle("region")
    image = rand_image(320, 240, 6)
    engine, off = Engine(b, block_size=8), Engine(b, block_size=8, **OFF)
    first = engine.add_request(image, "<image>\nFirst question?", GREEDY)
    engine.step()
    second = engine.add_request(image, "<image>\nSecond question?", GREEDY, toks(b.tokenizer, region(([3], [4]))))
    engine.step()
    r1, r2 = engine._requests[first], engine._requests[second]
    shared = [blk for blk in r2.blocks if blk in r1.blocks]
    assert shared and all(engine.cache.holders(blk) == 2 for blk in shared)
    assert engine.abort(first)
    assert all(engine.cache.holders(blk) == 1 for blk in shared)
    results = finish_all(engine)
    (want,) = one_by_one(off, [(image, "<image>\nSecond question?", GREEDY, toks(b.tokenizer, region(([3], [4]))))])
    assert results[first].finish_reason == "abort"
    assert_same_result(results[second], want, tol=TOL)
    assert_nothing_held(engine)


def test_a_rollback_into_a_block_another_request_holds(tiny_bundle, monkeypatch):
    """Round 1 written in tokens that the next turn spells otherwise, so the splice rolls back
    into a full block; a twin request recomputed after a preemption holds that same block.
    The one rolling back gives its hold up and recomputes the block's kept tokens; the twin's
    keys and values stay as they were."""
    b = tiny_bundle("region")
    tok = b.tokenizer
    spelled = [t for ch in "Look closer " for t in toks(tok, ch)]  # one token per character: "closer" merges
    forced = spelled + toks(tok, region(([1, 2], [3])))
    job = (rand_image(300, 200, 7), "<image>\nWhat is it?", SamplingParams(max_new_tokens=40, return_logits=True), forced)
    (want,) = one_by_one(Engine(b, block_size=4, **OFF), [job])
    assert want.trace and want.trace[0].tokens_rolled_back > 0
    engine = Engine(b, block_size=4)
    cut_blocks = []  # (holders, published) of the block each rollback cuts into
    shrink = engine._shrink

    def spy(r, length):
        if length % 4:
            block = r.blocks[length // 4]
            cut_blocks.append((engine.cache.holders(block), engine.cache.is_published(block)))
        shrink(r, length)

    monkeypatch.setattr(engine._splicer, "shrink", spy)
    a, twin = engine.add_request(*job), engine.add_request(*job)
    ra, rt = engine._requests[a], engine._requests[twin]
    while len(ra.round_ids) < len(forced) - 2:
        engine.step()
    engine._preempt(rt)  # recomputed at the next step, from a's blocks
    engine.step()
    assert rt.status.value == "running" and rt.blocks[: len(ra.blocks) - 1] == ra.blocks[:-1]
    results = finish_all(engine)
    for rid in (a, twin):
        assert_same_result(results[rid], want, tol=TOL, what=f"request {rid}")
    # a cut into the block both held, then the twin's cut into it once it alone holds it
    assert cut_blocks == [(2, True), (1, True)]
    assert_nothing_held(engine)


def test_caches_off_find_nothing(tiny_bundle):
    b = tiny_bundle("region")
    image = rand_image(200, 200, 8)
    engine = Engine(b, **OFF)
    one_by_one(engine, [(image, "<image>\nSame?", GREEDY, None)] * 2)
    stats = engine.stats()
    assert stats["cached_prompt_tokens"] == stats["prefix_cache_hits"] == stats["vision_cache_hits"] == 0
    assert stats["vision_encoder_images"] == 2 and engine.cache.num_cached_free == 0
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="enable_prefix_caching must be True or False"):
            Engine(b, enable_prefix_caching=bad)
    with pytest.raises(ValueError, match="encoder_cache_gib must be a number >= 0"):
        Engine(b, encoder_cache_gib=-1)


def test_a_request_waits_for_the_blocks_another_computes_and_never_for_a_gone_one(tiny_bundle):
    b = tiny_bundle("region")
    image = rand_image(320, 240, 9)
    jobs = [(image, f"<image>\nQuestion {i}?", GREEDY, None) for i in range(3)]
    engine = Engine(b, block_size=8)
    for job in jobs:
        engine.add_request(*job)
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 2  # the twins wait for the first one's blocks
    engine.clear()  # its blocks will never come: nothing waits for them any more
    assert one_by_one(engine, jobs[1:2])[0].finish_reason in ("stop", "length")
    first = engine.add_request(*jobs[0])
    engine.step()
    engine._preempt(engine._requests[first])  # the one computing is preempted: the others go on by themselves
    later = [engine.add_request(*job) for job in jobs[1:]]
    results = finish_all(engine)
    assert {results[i].finish_reason for i in [first, *later]} <= {"stop", "length"}
    assert_nothing_held(engine)


def test_eval_cli_with_and_without_the_caches(tiny_ckpt, tmp_path, monkeypatch, capsys):
    """`vpt-fast eval` over four questions per image: the same rows with --no-enable-prefix-caching
    and --encoder-cache-gib 0, which reach the engine; the summary says what the caches saved."""
    import json

    import vpt_fast.engine
    from vpt_fast.cli import main

    built = []

    class Recorded(Engine):
        def __init__(self, *args, **kwargs):
            built.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(vpt_fast.engine, "Engine", Recorded)
    lines = []
    for i in range(2):
        rand_image(260, 200, 20 + i).save(tmp_path / f"{i}.png")
        lines += [{"id": f"{i}-{q}", "image": f"{i}.png", "question": f"Question {q} about it?"} for q in range(4)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    rows = []
    for flags in ([], ["--no-enable-prefix-caching", "--encoder-cache-gib", "0"]):
        out = tmp_path / f"out{len(flags)}.jsonl"
        assert main(["eval", str(data), "--out", str(out), "--model", str(tiny_ckpt("region")), "--max-new-tokens", "4",
                     "--device", "cpu", "--batch-size", "8", *flags]) == 0
        rows.append([json.loads(line) for line in out.read_text().splitlines()])
        printed = capsys.readouterr().out
        if flags:
            assert "prompt tokens: " in printed and "0 of them from the prefix cache (0%)" in printed
        else:
            assert "prompt tokens: " in printed and "images encoded: 2 (" in printed
    assert rows[0] == rows[1] and len(rows[0]) == 8
    assert [(k["enable_prefix_caching"], k["encoder_cache_gib"]) for k in built] == [(True, None), (False, 0.0)]


@pytest.mark.gpu
@pytest.mark.parametrize("variant, script", [("region", region(([2, 4], [5, 6]))), ("clip", action("clip"))])
def test_the_caches_on_gpu_with_graphs(tiny_ckpt, variant, script):
    """On CUDA (captured decode steps, the device's attention kernels, float32): questions about
    shared images one by one and together, and under a cache too small for them, equal the
    engine with the caches off."""
    from vpt_fast.checkpoint import load_vpt_checkpoint

    b = load_vpt_checkpoint(tiny_ckpt(variant), device="cuda")
    images = [rand_image(400, 300, 30 + i) for i in range(2)]
    jobs = [(images[i % 2], f"<image>\nQuestion {i}?", GREEDY, toks(b.tokenizer, script) if i % 3 else None)
            for i in range(6)]
    for options in (dict(block_size=8), dict(block_size=8, kv_cache_tokens=700, max_batch_size=4)):
        engine, off = Engine(b, **options), Engine(b, **options, **OFF)
        assert_same(one_by_one(engine, jobs), one_by_one(off, jobs), f"{variant} one by one {options}")
        assert_same(together(engine, jobs), together(off, jobs), f"{variant} together {options}")
        assert engine.stats()["cached_prompt_tokens"] > 0
        assert_nothing_held(engine)


def test_pad_tokens_the_model_writes_itself_end_no_other_request(tiny_bundle):
    """A round 1 that writes `<|image_pad|>` tokens (pads with no image of their own) is cached
    without a hash for those blocks and goes on; one that writes a re-encoding pad before asking
    for a re-encoding ends alone with an error naming it: the request beside it is untouched."""
    b = tiny_bundle("clip")
    tok = b.tokenizer
    image = rand_image(40, 40)
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    written = toks(tok, "hello there") + [pad] * 20 + toks(tok, " and more text to fill a block")
    reencode = toks(tok, "look <|clip_image_pad|> now") + toks(tok, action("clip"))
    engine = Engine(b)
    got = engine.generate([image] * 3, ["<image>\nWhat?"] * 3, 80, forced_tokens=[written, reencode, None])
    (alone,) = Engine(b).generate([image], ["<image>\nWhat?"], 80)
    assert got[0].finish_reason == "length" and got[0].token_ids[: len(written)] == written
    assert got[1].finish_reason == "error" and re.fullmatch(
        r"request 1: round 0 holds a re-encoding pad token the next round would read again as an image; "
        r"the request cannot go on", got[1].error)
    assert got[2].token_ids == alone.token_ids
    assert engine.kv_blocks_used == 0
