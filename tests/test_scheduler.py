"""Continuous batching: requests joining at any step, mixed sampling, abort, preemption.

Every request run through the step API, whatever else runs beside it and whenever it
joins, gives exactly what it gives alone (greedy tokens, logits within 1e-4)."""

import random

import pytest
from vpt_cases import action, assert_same_result, rand_image, region, toks

from vpt_fast import SamplingParams
from vpt_fast.engine import Engine, FinishEvent, PerceptionEvent, TokenEvent

SCRIPTS = {
    "region": [region(([2, 4], [5, 6])), region(([0, 3], [1]), ([6], [2, 7]), ([4], [4])), None,
               "I should look closer " + region(([1], [1, 2])), "<|region_token_start|><|y_2|><|region_token_end|><|im_end|>"],
    "clip": [action("clip"), region(([2], [3])), "Well " + action("clip"), region(([1], [1]), eos=False) + action("clip"),
             "Plain text only<|im_end|>", None],
    "dino": [action("dino"), "Let me see " + action("dino"), region(([5], [0, 1])), None],
    "sam": [action("sam"), region(([0, 7], [3])), action("clip"), None],
}
SIZES = [(196, 112), (64, 64), (333, 517), (500, 90), (28, 300), (120, 120), (45, 61)]
PROMPTS = ["<image>\nWhat color?", "How many people are there?", "Where?", "<image> Describe it.", "Hi", "Name it."]


def requests_for(bundle, variant, params):
    tok = bundle.tokenizer
    out = []
    for i, script in enumerate(SCRIPTS[variant]):
        w, h = SIZES[i % len(SIZES)]
        out.append((rand_image(w, h, i), PROMPTS[i % len(PROMPTS)], params, toks(tok, script) if script else None))
    return out


def alone(bundle, requests, **engine_options):
    results = []
    for image, prompt, params, forced in requests:
        engine = Engine(bundle, **engine_options)
        rid = engine.add_request(image, prompt, params, forced)
        results.append(finish_all(engine)[rid])
    return results


def finish_all(engine, events=None):
    """Step until nothing is in flight; {request id: result}."""
    out = {}
    while engine.has_unfinished():
        for event in engine.step():
            if events is not None:
                events.append(event)
            if isinstance(event, FinishEvent):
                out[event.request] = event.result
    return out


def staggered(engine, requests, seed):
    """Add the requests at random steps, and right after another request's round ends (so a
    new request's prefill shares a step with that request's perception splice)."""
    rng = random.Random(seed)
    todo = list(enumerate(requests))
    ids, results, splice_shared = {}, {}, 0
    while todo or engine.has_unfinished():
        round_ended = False
        for event in engine.step() if engine.has_unfinished() else []:
            if isinstance(event, FinishEvent):
                results[event.request] = event.result
            if isinstance(event, TokenEvent) and event.round == 0 and event.token_id == engine.vocab.im_end:
                round_ended = True
        if todo and (round_ended or rng.random() < 0.4 or not engine.has_unfinished()):
            i, (image, prompt, params, forced) = todo.pop(0)
            ids[engine.add_request(image, prompt, params, forced)] = i
            splice_shared += round_ended
    return [results[rid] for rid, _ in sorted(ids.items(), key=lambda kv: kv[1])], splice_shared


@pytest.mark.parametrize("variant", ["region", "clip", "dino", "sam"])
def test_requests_joining_at_any_step_equal_their_alone_results(tiny_bundle, variant):
    b = tiny_bundle(variant)
    params = SamplingParams(max_new_tokens=10, return_logits=True)
    requests = requests_for(b, variant, params)
    want = alone(b, requests)
    assert sum(bool(r.trace) for r in want) >= 2
    for seed in (0, 1):
        got, shared = staggered(Engine(b), requests, seed)
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_result(g, w, what=f"{variant} request {i}, seed {seed}")
    assert shared >= 1  # some request joined while another one's perception was being spliced


def test_greedy_and_sampled_requests_in_one_batch(tiny_bundle):
    b = tiny_bundle("clip")
    tok = b.tokenizer
    kinds = [SamplingParams(max_new_tokens=8, return_logits=True),
             SamplingParams(max_new_tokens=8, do_sample=True, seed=1, return_logits=True),
             SamplingParams(max_new_tokens=8, do_sample=True, seed=2, top_k=20, top_p=0.9, return_logits=True),
             SamplingParams(max_new_tokens=8, do_sample=True, seed=3, temperature=0.7, return_logits=True),
             SamplingParams(max_new_tokens=8, do_sample=True, seed=1, return_logits=True)]
    requests = [(rand_image(60 + 9 * i, 70, i), "Describe.", p, toks(tok, action("clip")) if i == 2 else None)
                for i, p in enumerate(kinds)]
    want = alone(b, requests)
    for seed in (0, 1):
        got, _ = staggered(Engine(b), requests, seed)
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_result(g, w, what=f"request {i}, seed {seed}")
    # the same seed and image give the same sample, whatever is batched beside it
    twin = alone(b, [(requests[1][0], "Describe.", kinds[4], None)])[0]
    assert twin.token_ids == want[1].token_ids
    # and another seed gives other tokens
    assert want[1].token_ids != alone(b, [(requests[1][0], "Describe.", SamplingParams(max_new_tokens=8, do_sample=True,
                                                                                        seed=7), None)])[0].token_ids


def test_abort_while_decoding_pending_a_perception_and_queued(tiny_bundle):
    b = tiny_bundle("region")
    tok = b.tokenizer
    params = SamplingParams(max_new_tokens=12, return_logits=True)
    keeper = (rand_image(90, 70, 1), "Describe it.", params, toks(tok, region(([1], [2]))))
    (want,) = alone(b, [keeper])
    engine = Engine(b, max_batch_size=3)
    keep = engine.add_request(*keeper)
    decoding = engine.add_request(rand_image(50, 50, 2), "Long answer please.", params, None)
    perceiving = engine.add_request(rand_image(80, 60, 3), "Where?", params, toks(tok, region(([2], [3]))))
    queued = engine.add_request(rand_image(40, 40, 4), "Queued.", params, None)  # the batch holds three
    events = engine.step()
    assert engine.num_running == 3 and engine.num_waiting == 1
    used = engine.kv_blocks_used
    assert engine.abort(queued) and not engine.abort(queued)
    assert engine.kv_blocks_used == used  # a queued request holds no blocks
    events += engine.step()
    events += engine.step()
    held, used = len(engine._requests[decoding].blocks), engine.kv_blocks_used
    assert held and engine.abort(decoding)
    assert engine.kv_blocks_used == used - held
    while not any(isinstance(e, TokenEvent) and e.request == perceiving and e.token_id == b.vocab.im_end for e in events):
        events += engine.step()  # until `perceiving` has ended round 1 and waits for its splice
    held, used = len(engine._requests[perceiving].blocks), engine.kv_blocks_used
    assert held and engine._requests[perceiving].pending  # its crop is spliced into its sequence, not yet prefilled
    assert engine.abort(perceiving)
    assert engine.kv_blocks_used == used - held
    finish_all(engine, events)
    results = {e.request: e.result for e in events if isinstance(e, FinishEvent)}
    assert {results[rid].finish_reason for rid in (queued, decoding, perceiving)} == {"abort"}
    assert "aborted" in results[perceiving].error and results[perceiving].trace == []
    assert not any(isinstance(e, PerceptionEvent) and e.request == perceiving for e in events)
    assert_same_result(results[keep], want)
    assert engine.kv_blocks_used == 0 and not engine.has_unfinished()
    assert not engine.abort(keep) and not engine.abort(12345)


def test_abort_frees_the_blocks_at_once(tiny_bundle):
    b = tiny_bundle("region")
    engine = Engine(b)
    rid = engine.add_request(rand_image(80, 80), "Hello there.", SamplingParams(max_new_tokens=20))
    for _ in range(3):
        engine.step()
    held = len(engine._requests[rid].blocks)
    used = engine.kv_blocks_used
    assert held and used == held
    engine.abort(rid)
    assert engine.kv_blocks_used == 0
    (event,) = engine.step()
    assert isinstance(event, FinishEvent) and event.result.finish_reason == "abort" and len(event.result.token_ids) == 3


def test_a_cache_too_small_for_everyone_preempts_and_recomputes(tiny_bundle):
    b = tiny_bundle("clip")
    params = SamplingParams(max_new_tokens=14, return_logits=True)
    requests = requests_for(b, "clip", params)
    want = alone(b, requests)
    longest = max(len(r.token_ids) for r in want)
    # room for the largest request (about 530 tokens with its crop) but not for all six at once (about
    # 1000): the others queue, and growing ones preempt the youngest
    engine = Engine(b, kv_cache_tokens=600, block_size=8)
    ids = [engine.add_request(*r) for r in requests]
    events = []
    results = finish_all(engine, events)
    assert engine.num_preemptions >= 1 and longest > 4
    for i, rid in enumerate(ids):
        assert_same_result(results[rid], want[i], what=f"request {i}")
    assert engine.kv_blocks_used == 0


def test_a_request_larger_than_the_whole_cache_ends_with_length(tiny_bundle):
    b = tiny_bundle("region")
    tok = b.tokenizer
    engine = Engine(b, kv_cache_tokens=64, block_size=8)
    small = (rand_image(28, 28, 1), "Hi", SamplingParams(max_new_tokens=4), None)
    big = engine.add_request(rand_image(300, 300, 2), "Describe the whole picture.", SamplingParams(max_new_tokens=4))
    crop = engine.add_request(rand_image(56, 56, 3), "Q", SamplingParams(max_new_tokens=8), toks(tok, region(([0, 7], [0, 7]))))
    grow = engine.add_request(small[0], small[1], SamplingParams(max_new_tokens=200), toks(tok, "The answer is red. " * 12))
    ok = engine.add_request(*small)
    results = finish_all(engine)
    assert results[big].finish_reason == "length" and "more than what the KV cache holds (64 tokens)" in results[big].error
    assert results[big].token_ids == []
    assert results[crop].finish_reason == "no_room" and "more than what the KV cache holds (64 tokens)" in results[crop].error
    assert results[grow].finish_reason == "length" and "what the KV cache holds (64 tokens)" in results[grow].error
    assert results[ok].finish_reason in ("stop", "length") and results[ok].error is None
    assert_same_result(results[ok], alone(b, [small])[0])
    assert engine.kv_blocks_used == 0


def test_max_batch_size_bounds_the_running_requests(tiny_bundle):
    b = tiny_bundle("region")
    engine = Engine(b, max_batch_size=2)
    requests = [(rand_image(40 + i, 40, i), f"Question {i}?", SamplingParams(max_new_tokens=5 + i), None) for i in range(5)]
    ids = [engine.add_request(*r) for r in requests]
    seen = []
    results = {}
    while engine.has_unfinished():
        for event in engine.step():
            if isinstance(event, FinishEvent):
                results[event.request] = event.result
        seen.append(engine.num_running)
    assert max(seen) == 2 and len(results) == 5
    for rid, want in zip(ids, alone(b, requests)):
        assert_same_result(results[rid], want)


def test_step_api_misuse(tiny_bundle):
    b = tiny_bundle("region")
    engine = Engine(b)
    with pytest.raises(TypeError, match="params must be a SamplingParams, got dict"):
        engine.add_request(rand_image(30, 30), "Q", {"max_new_tokens": 3})
    for bad, message in ((dict(max_new_tokens=0), "max_new_tokens must be a positive int"),
                         (dict(temperature=0.0), "temperature must be a positive number"),
                         (dict(top_k=0), "top_k must be a positive int"), (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
                         (dict(seed=1.5), "seed must be an int"), (dict(max_perception_rounds=-1), "max_perception_rounds"),
                         (dict(do_sample="yes"), "do_sample must be a bool")):
        with pytest.raises(ValueError, match=message):
            SamplingParams(**bad)
    rid = engine.add_request(rand_image(30, 30), "Q", SamplingParams(max_new_tokens=3))
    with pytest.raises(RuntimeError, match="1 request\\(s\\) added with add_request are in flight"):
        engine.generate([rand_image(30, 30)], ["Q"])
    assert rid in finish_all(engine)
    assert engine.step() == []  # nothing in flight: a step does nothing


def test_a_stream_closed_early_leaves_the_engine_clean(tiny_bundle):
    b = tiny_bundle("region")
    engine = Engine(b)
    stream = engine.stream([rand_image(50, 50, i) for i in range(3)], ["A", "B", "C"], 10)
    next(stream)
    next(stream)
    stream.close()
    assert not engine.has_unfinished() and engine.kv_blocks_used == 0
    (after,) = engine.generate([rand_image(50, 50)], ["A"], 4, return_logits=True)
    assert_same_result(after, Engine(b).generate([rand_image(50, 50)], ["A"], 4, return_logits=True)[0])


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["region", "clip"])
def test_continuous_batching_on_gpu_with_graphs(tiny_ckpt, variant):
    """On CUDA, captured decode steps and Triton attention: staggered requests equal their alone results
    computed eagerly, and a cache too small for all of them preempts and recomputes the same."""
    from vpt_fast.checkpoint import load_vpt_checkpoint

    b = load_vpt_checkpoint(tiny_ckpt(variant), device="cuda")
    params = SamplingParams(max_new_tokens=10, return_logits=True)
    requests = requests_for(b, variant, params)
    want = alone(b, requests, cuda_graphs=False)
    for engine in (Engine(b, cuda_graphs=True), Engine(b, cuda_graphs=True, kv_cache_tokens=600, block_size=8)):
        got, _ = staggered(engine, requests, seed=3)
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_result(g, w, what=f"{variant} request {i}")
        assert engine.kv_blocks_used == 0


def test_admission_keeps_room_for_the_running_requests_to_grow(tiny_bundle):
    """24 requests whose answers of 150 tokens cannot all fit in a 2,500-token cache: admission
    lets in only what can grow to its limit, so decoding does not preempt and recompute (it used
    to preempt 13 times, recomputing twice the prompts' tokens)."""
    b = tiny_bundle("region")
    prompts = [f"Question {i}: " + "describe the picture in one sentence. " * 6 for i in range(24)]
    engine = Engine(b, max_seq_len=512, kv_cache_tokens=2500, max_batch_size=32)
    params = SamplingParams(max_new_tokens=150, stop_token_ids=())
    ids = [engine.add_request(None, p, params) for p in prompts]
    results = finish_all(engine, [])
    stats = engine.stats()
    assert stats["preemptions"] <= 2 and stats["recomputed_tokens"] <= 0.1 * stats["prompt_tokens"], stats
    assert stats["prompt_tokens"] == stats["computed_prompt_tokens"] + stats["cached_prompt_tokens"] == \
        sum(results[i].prompt_tokens for i in ids)
    assert stats["running"] == stats["waiting"] == stats["kv_blocks_used"] == 0
    for i in (0, 23):
        (want,) = Engine(b, max_seq_len=512).generate([None], [prompts[i]], 150)
        assert results[ids[i]].token_ids == want.token_ids


@pytest.mark.parametrize("variant", ["region", "clip", "dino"])
@pytest.mark.parametrize("budget", [7, 40])
def test_chunked_prefill_gives_what_one_prefill_gives(tiny_bundle, variant, budget):
    """Prompts, images, perception segments (crops, re-encoded pads, control-vector action tokens)
    prefilled in chunks of at most `budget` tokens a step, the others decoding meanwhile: the
    same tokens as one prefill each, float32 logits within 1e-5."""
    b = tiny_bundle(variant)
    params = SamplingParams(max_new_tokens=10, return_logits=True)
    requests = requests_for(b, variant, params)
    want = alone(b, requests, max_num_batched_tokens=None)
    engine = Engine(b, max_num_batched_tokens=budget)
    ids = [engine.add_request(*r) for r in requests]
    events = []
    sizes = []
    real_run = engine._segments.run

    def run(jobs, limit):
        fed = real_run(jobs, limit)
        sizes.append(sum(fed.values()))
        return fed

    engine._segments.run = run
    results = finish_all(engine, events)
    for i, rid in enumerate(ids):
        assert_same_result(results[rid], want[i], tol=1e-5, what=f"{variant} request {i}")
    assert max(sizes) <= budget and len(sizes) > len(requests)  # chunks, never over the budget
    stats = engine.stats()
    # requests with a common prefix may find each other's blocks (prefix caching), whatever the chunking
    assert stats["prompt_tokens"] == stats["computed_prompt_tokens"] + stats["cached_prompt_tokens"] == \
        sum(w.prompt_tokens for w in want)
    assert engine.kv_blocks_used == 0
