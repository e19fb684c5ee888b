"""What real clients ask of a request, in the engine: stop strings, presence and frequency
penalties, log-probabilities, n answers and structured outputs, each checked against an
independent computation: the log-softmax of the engine's own logits, OpenAI's penalty rule
applied by hand to them, the text without the stop string cut by hand, a request alone with
the seed an answer takes, and the grammar checked on the text (json.loads and the schema, the
choice set, re.fullmatch)."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from vpt_cases import rand_image, region, toks

from vpt_fast import SamplingParams
from vpt_fast.engine import Engine, FinishEvent, TokenEvent
from vpt_fast.engine.text import IncrementalText, cut_at_stop
from vpt_fast.sampling import StructuredOutput, answer_seed

PROMPT = "<image>\nDescribe the picture."
IMAGE = rand_image(64, 48, seed=3)


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return Engine(tiny_bundle("region"), max_batch_size=8)


def run(engine, params, prompts=(PROMPT,), images=None, forced=None):
    images = list(images) if images is not None else [IMAGE] * len(prompts)
    ids = [engine.add_request(images[i], p, params, None if forced is None else forced[i]) for i, p in enumerate(prompts)]
    events, results = [], {}
    while engine.has_unfinished():
        for e in engine.step():
            events.append(e)
            if isinstance(e, FinishEvent):
                results.setdefault(e.request, {})[e.index] = e.result
    return [results[i] if params.n > 1 else results[i][0] for i in ids], events


# ---------------------------------------------------------------------------- text and stops


def test_incremental_text_is_the_full_decode(tiny_bundle):
    """Random token ids (multi-byte characters split across tokens, special tokens among them):
    the text added token by token equals one decode of them all, at every length."""
    tok = tiny_bundle("region").tokenizer
    rng = random.Random(0)
    cases = [[rng.randrange(len(tok)) for _ in range(40)] for _ in range(20)]
    cases.append(toks(tok, "héllo wörld ✓ 日本語 — ok") + [tok.convert_tokens_to_ids("<|im_end|>")])
    for ids in cases:
        text = IncrementalText(tok)
        for i, t in enumerate(ids):
            text.add(t)
            full = tok.decode(ids[: i + 1], skip_special_tokens=True)
            assert full.startswith(text.text)
            assert full == text.text or full.endswith("\ufffd")  # only a character cut short is held back
        text.rest()
        assert text.text == tok.decode(ids, skip_special_tokens=True)


def test_cut_at_stop():
    assert cut_at_stop("say hello world", ("lo w", "world"), False) == ("say hel", "lo w")
    assert cut_at_stop("say hello world", ("lo w", "world"), True) == ("say hello w", "lo w")
    assert cut_at_stop("abc", ("x",), False) == ("abc", None)
    assert cut_at_stop("aab", ("ab", "aab"), False) == ("", "aab")  # the earliest, the longest among equals


def test_stop_strings_split_across_tokens(engine):
    """A stop string taken from the middle of a plain answer, across a token boundary: the
    answer stops at the token that completes it, its text ends before it (or with it), the
    reason is "stop" and stop_reason names it; streaming sent no text past it."""
    params = SamplingParams(max_new_tokens=30, stop_token_ids=())
    (want,), _ = run(engine, params, ["Tell me a story."], [None])
    tok = engine.bundle.tokenizer
    text, body = want.text, want.token_ids
    # a string across a token boundary (two characters before it, two after), its first occurrence
    ends = [len(tok.decode(body[: i + 1], skip_special_tokens=True)) for i in range(len(body))]
    start, stop = next((e - 2, text[e - 2 : e + 2]) for e in ends[3:] if 2 <= e <= len(text) - 2
                       and "\ufffd" not in text[e - 2 : e + 2] and text.find(text[e - 2 : e + 2]) == e - 2)
    for include in (False, True):
        p = SamplingParams(max_new_tokens=30, stop=(stop, "\x00never"), include_stop_str_in_output=include)
        (got,), events = run(engine, p, ["Tell me a story."], [None])
        assert got.finish_reason == "stop" and got.stop_reason == stop
        assert got.text == text[: start + (len(stop) if include else 0)]
        completed = next(i for i in range(len(body)) if stop in tok.decode(body[: i + 1], skip_special_tokens=True))
        assert got.token_ids == want.token_ids[: completed + 1]


def test_stop_token_ids_name_the_stop_reason(engine):
    params = SamplingParams(max_new_tokens=30)
    (want,), _ = run(engine, params, ["Tell me a story."], [None])
    t = want.token_ids[4]
    (got,), _ = run(engine, SamplingParams(max_new_tokens=30, stop_token_ids=(t,)), ["Tell me a story."], [None])
    assert got.finish_reason == "stop" and got.stop_reason == t and got.token_ids == want.token_ids[: want.token_ids.index(t) + 1]


# ---------------------------------------------------------------------------- penalties


def by_hand(logits: list[torch.Tensor], tokens: list[int], rounds: list[int], presence: float, frequency: float,
            repetition: float, seen_at_start: list[set]) -> list[int]:
    """Greedy tokens from raw logits with transformers' repetition penalty over the sequence
    and OpenAI's presence/frequency rule over the round's tokens, applied step by step."""
    out = []
    for i, row in enumerate(logits):
        row = row.double().clone()
        rnd = rounds[i]
        before = [t for j, t in enumerate(tokens[:i]) if rounds[j] == rnd]
        seen = sorted(seen_at_start[rnd] | set(before))
        if repetition != 1.0 and seen:
            picked = row[seen]
            row[seen] = torch.where(picked < 0, picked * repetition, picked / repetition)
        for t in set(before):
            row[t] -= presence + before.count(t) * frequency
        out.append(int(row.argmax()))
    return out


@pytest.mark.parametrize("presence,frequency,repetition", [(1.5, 0.0, 1.0), (0.0, 1.2, 1.0), (-0.8, 0.7, 1.3)])
def test_presence_and_frequency_penalties_by_hand(engine, presence, frequency, repetition):
    """Greedy answers with penalties: every token is the argmax of the engine's own raw logits
    after the penalties applied by hand; a region perception starts the count afresh (its
    answer is a new generation, as in the two-round flow)."""
    tok = engine.bundle.tokenizer
    params = SamplingParams(max_new_tokens=24, return_logits=True, presence_penalty=presence,
                            frequency_penalty=frequency, repetition_penalty=repetition, stop_token_ids=())
    forced = [None, toks(tok, region(([1, 2], [3, 4])))]
    results, _ = run(engine, params, [PROMPT, PROMPT], forced=forced)
    plain = SamplingParams(max_new_tokens=24, stop_token_ids=())
    unpenalized, _ = run(engine, plain, [PROMPT, PROMPT], forced=forced)
    assert any(r.token_ids != u.token_ids for r, u in zip(results, unpenalized))  # the penalties did something
    for r in results:
        n1 = len(r.round1_ids)
        rounds = [0] * n1 + [1] * (len(r.token_ids) - n1)
        prompt = r.sequence_ids[: r.prompt_tokens]
        # what the repetition penalty sees at a round's start: the sequence the round reads
        second = r.sequence_ids[: len(r.sequence_ids) - len(r.answer_ids)] if r.trace else []
        want = by_hand(r.logits, r.token_ids, rounds, presence, frequency, repetition, [set(prompt), set(second)])
        free = range(len(forced[1]) if r.trace else 0, len(r.token_ids))  # forced round-1 tokens are not chosen
        assert [r.token_ids[i] for i in free] == [want[i] for i in free]


# ---------------------------------------------------------------------------- logprobs


@pytest.mark.parametrize("sampled", [False, True])
def test_logprobs_are_the_raw_log_softmax(engine, sampled):
    """Each generated token's logprob and the top alternatives are the log-softmax of the
    engine's own raw logits (before the penalty and temperature); in the stream as in the
    result, for a plain answer and one after a region perception."""
    tok = engine.bundle.tokenizer
    params = SamplingParams(max_new_tokens=12, return_logits=True, logprobs=5, do_sample=sampled, temperature=0.7,
                            seed=4, repetition_penalty=1.4)
    results, events = run(engine, params, [PROMPT, PROMPT], forced=[None, toks(tok, region(([0], [5])))])
    for r in results:
        assert len(r.logprobs) == len(r.token_ids) == len(r.logits)
        for t, entry, row in zip(r.token_ids, r.logprobs, r.logits):
            ref = torch.log_softmax(row.double(), -1)
            assert entry.token_id == t and abs(entry.logprob - ref[t].item()) < 1e-5
            top = ref.topk(5)
            assert [i for i, _ in entry.top] == top.indices.tolist()
            assert max(abs(v - w) for (_, v), w in zip(entry.top, top.values.tolist())) < 1e-5
    streamed: dict[int, list] = {}
    for e in events:
        if isinstance(e, TokenEvent):
            streamed.setdefault(e.request, []).append(e.logprob)
    assert [streamed[i] for i in sorted(streamed)] == [r.logprobs for r in results]
    (off,), _ = run(engine, SamplingParams(max_new_tokens=4))
    assert off.logprobs is None


# ---------------------------------------------------------------------------- n


def test_n_answers_share_one_prefill_and_have_their_own_seeds(tiny_bundle):
    """n = 4 sampled answers: answer k is what a request alone gives with the seed
    answer_seed(seed, k) (answer 0: the seed itself), tokens and logits; the prompt is
    prefilled once; the same call again gives the same answers; events carry the index and
    only the last FinishEvent is final."""
    engine = Engine(tiny_bundle("region"), max_batch_size=8, enable_prefix_caching=False)
    params = SamplingParams(max_new_tokens=10, do_sample=True, temperature=1.2, seed=11, n=4, return_logits=True,
                            stop_token_ids=())
    (answers,), events = run(engine, params)
    stats = engine.stats()
    assert sorted(answers) == [0, 1, 2, 3] and [answers[k].index for k in range(4)] == [0, 1, 2, 3]
    prompt = answers[0].prompt_tokens
    assert stats["computed_prompt_tokens"] == stats["prompt_tokens"] == prompt  # one prefill for four answers
    finals = [e.final for e in events if isinstance(e, FinishEvent)]
    assert finals == [False, False, False, True]
    assert {e.index for e in events if isinstance(e, TokenEvent)} == {0, 1, 2, 3}
    alone = Engine(tiny_bundle("region"), max_batch_size=8, enable_prefix_caching=False)
    for k in range(4):
        (want,), _ = run(alone, SamplingParams(max_new_tokens=10, do_sample=True, temperature=1.2, return_logits=True,
                                               seed=answer_seed(11, k), stop_token_ids=()))
        assert answers[k].token_ids == want.token_ids
        worst = max((a - b).abs().max().item() for a, b in zip(answers[k].logits, want.logits))
        assert worst <= 1e-5
    assert len({tuple(answers[k].token_ids) for k in range(4)}) > 1
    (again,), _ = run(engine, params)
    assert [again[k].token_ids for k in range(4)] == [answers[k].token_ids for k in range(4)]
    assert engine.kv_blocks_used == 0


def test_n_through_generate_and_abort(tiny_bundle):
    engine = Engine(tiny_bundle("region"), max_batch_size=8)
    out = engine.generate([IMAGE, None], [PROMPT, "Hello."], 6, n=3, do_sample=True, seed=2)
    assert [len(x) for x in out] == [3, 3] and [a.index for a in out[1]] == [0, 1, 2]
    rid = engine.add_request(IMAGE, PROMPT, SamplingParams(max_new_tokens=50, n=3, stop_token_ids=()))
    engine.step()
    engine.step()
    assert engine.abort(rid)
    events = engine.step()
    ended = [e for e in events if isinstance(e, FinishEvent)]
    assert sorted(e.index for e in ended) == [0, 1, 2] and all(e.result.finish_reason == "abort" for e in ended)
    assert not engine.has_unfinished() and engine.kv_blocks_used == 0


def test_n_with_a_failed_request_ends_every_answer(engine):
    (answers,), _ = run(engine, SamplingParams(n=2), ["<image>\n<image>\ntwo"], [IMAGE])
    assert [answers[k].finish_reason for k in (0, 1)] == ["error", "error"]


# ---------------------------------------------------------------------------- structured outputs

SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "sure": {"type": "boolean"}},
          "required": ["answer", "count", "sure"], "additionalProperties": False}


def matches_schema(value) -> bool:
    return (isinstance(value, dict) and set(value) == {"answer", "count", "sure"} and value["answer"] in ("yes", "no")
            and type(value["count"]) is int and 0 <= value["count"] <= 99 and type(value["sure"]) is bool)


@pytest.mark.parametrize("kind", ["json_schema", "json_object", "choice", "regex", "grammar"])
def test_structured_outputs_hold_every_time(engine, kind):
    """Twelve sampled answers of the random model (no image: the answer starts at round 1's
    first token) each parse and match their constraint."""
    spec, check = {
        "json_schema": (SCHEMA, lambda t: matches_schema(json.loads(t))),
        "json_object": (None, lambda t: isinstance(json.loads(t), dict)),
        "choice": (["red", "green", "light blue"], lambda t: t in ("red", "green", "light blue")),
        "regex": (r"[A-C][0-9]{2}", lambda t: re.fullmatch(r"[A-C][0-9]{2}", t) is not None),
        "grammar": ('root ::= "(" num ("+" num)* ")"\nnum ::= [1-9]', lambda t: re.fullmatch(r"\([1-9](\+[1-9])*\)", t)),
    }[kind]
    params = SamplingParams(max_new_tokens=60, do_sample=True, temperature=1.0, seed=1,
                            structured=StructuredOutput(kind, spec))
    results, _ = run(engine, params, [f"Answer {i}." for i in range(12)], [None] * 12)
    for r in results:
        if kind == "json_object" and r.finish_reason == "length":
            continue  # any JSON object may outgrow the token limit; the schema above bounds its size
        assert r.finish_reason == "stop" and check(r.text), (r.finish_reason, r.text)


def test_structured_answer_after_a_perception(engine):
    """A request with an image may open round 1 with a perception (forced here): round 1 is not
    constrained, the answer after the crop is; scripted answer tokens the grammar refuses end
    the request with an error naming it."""
    tok = engine.bundle.tokenizer
    params = SamplingParams(max_new_tokens=40, do_sample=True, seed=3,
                            structured=StructuredOutput("choice", ["left", "right"]))
    forced = [toks(tok, region(([2], [2]))), toks(tok, "up")]
    results, _ = run(engine, params, [PROMPT, PROMPT], forced=forced)
    assert results[0].trace and results[0].text in ("left", "right") and results[0].finish_reason == "stop"
    assert results[1].finish_reason == "error" and "does not fit the structured output" in results[1].error


def test_perception_openers_are_allowed_where_the_answer_begins(engine):
    """The first token of round 1 may be a perception opener beside the grammar's tokens; later
    tokens only what the grammar allows; without an image, no opener."""
    from vpt_fast.engine.structured import unpack

    book = engine.grammars
    c = book.constraint(StructuredOutput("choice", ["ab"]))
    mask = torch.full((1, book.words), -1, dtype=torch.int32)
    c.fill(mask, 0)
    allowed = set(unpack(mask, book.vocab_size)[0].nonzero()[:, 0].tolist())
    assert engine.vocab.region_start in allowed and engine.vocab.im_end not in allowed
    c.openers = None
    c.fill(mask, 0)
    assert engine.vocab.region_start not in set(unpack(mask, book.vocab_size)[0].nonzero()[:, 0].tolist())


def test_a_grammar_that_cannot_compile_fails_its_request_alone(engine):
    bad = SamplingParams(structured=StructuredOutput("grammar", "root ::= (("))
    good = SamplingParams(max_new_tokens=4)
    r1 = engine.add_request(None, "Hi.", bad)
    r2 = engine.add_request(None, "Hi.", good)
    results = {}
    while engine.has_unfinished():
        for e in engine.step():
            if isinstance(e, FinishEvent):
                results[e.request] = e.result
    assert results[r1].finish_reason == "error" and results[r1].error.startswith(
        f"request {r1}: the grammar cannot be compiled: "), results[r1].error
    assert results[r2].finish_reason in ("length", "stop") and results[r2].error is None


def test_structured_params_are_checked():
    with pytest.raises(ValueError, match="must be one of"):
        StructuredOutput("yaml", "x")
    with pytest.raises(ValueError, match="non-empty list"):
        StructuredOutput("choice", [])
    with pytest.raises(ValueError, match=r"n must be an int in \[1, 16\]"):
        SamplingParams(n=17)
    with pytest.raises(ValueError, match=r"logprobs must be None or an int in \[0, 20\]"):
        SamplingParams(logprobs=21)
    with pytest.raises(ValueError, match=r"presence_penalty must be a number in \[-2, 2\]"):
        SamplingParams(presence_penalty=3)
    with pytest.raises(ValueError, match="stop must be a sequence of non-empty strings"):
        SamplingParams(stop=("",))
    assert SamplingParams(stop="x").stop == ("x",)
