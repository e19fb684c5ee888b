"""Sampling draws from the distribution transformers' own processors define, and a seeded
request's tokens depend on its seed alone.

The first sampled token of many requests (one seed each) is counted and compared, by a
chi-square test, with the exact distribution that transformers' RepetitionPenaltyLogitsProcessor,
TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper make of the engine's own logits.
The seeds are fixed, so the test is deterministic; the p-value bound (1e-6) is what a correct
sampler passes with near certainty and a wrong one (checked: the same counts against the
distribution without the temperature) fails.
"""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from vpt_cases import rand_image

from vpt_fast import SamplingParams
from vpt_fast.engine import Engine, FinishEvent

DRAWS = 2000
P_MIN = 1e-6
PROMPT = "Describe the picture in one sentence."
CASES = {
    "temperature": dict(temperature=1.3),
    "top-k and top-p": dict(temperature=0.9, top_k=25, top_p=0.6),
    "top-p and repetition penalty": dict(temperature=1.1, top_p=0.8, repetition_penalty=1.8),
}


def exact(logits: torch.Tensor, prompt_ids: list[int], temperature=1.0, top_k=None, top_p=None,
          repetition_penalty=1.0) -> torch.Tensor:
    """transformers' distribution of the next token, from raw logits (vocab,)."""
    ids, scores = torch.tensor([prompt_ids]), logits[None].double()
    if repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(repetition_penalty)(ids, scores)
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return torch.softmax(scores, -1)[0]


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of observed counts against probabilities; bins expecting fewer than 5 draws pooled."""
    n = counts.sum()
    expected = probs.double() * n
    assert counts[expected == 0].sum() == 0, "a token the distribution excludes was drawn"
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big].sum(0, keepdim=True).double()])
    exp = torch.cat([expected[big], expected[~big].sum(0, keepdim=True)])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def first_tokens(engine: Engine, params: dict, n: int, image=None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(counts of the first sampled token over n seeds, the logits behind it, the prompt ids)."""
    ids = {engine.add_request(image, PROMPT, SamplingParams(max_new_tokens=1, do_sample=True, seed=seed,
                                                           return_logits=True, **params)): seed for seed in range(n)}
    counts = torch.zeros(engine.bundle.model.config.text_config.vocab_size, dtype=torch.long)
    logits = prompt = None
    while engine.has_unfinished():
        for event in engine.step():
            if isinstance(event, FinishEvent) and event.request in ids:
                r = event.result
                counts[r.token_ids[0]] += 1
                if logits is None:
                    logits, prompt = r.logits[0], r.sequence_ids[: r.prompt_tokens]
                else:
                    assert (r.logits[0] - logits).abs().max() <= 1e-4  # one prompt: one distribution
    return counts, logits, prompt


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return Engine(tiny_bundle("region"), max_seq_len=256, max_batch_size=64, kv_cache_tokens=64 * 256)


@pytest.mark.parametrize("case", list(CASES))
def test_draws_follow_transformers_distribution(engine, case):
    params = CASES[case]
    counts, logits, prompt = first_tokens(engine, params, DRAWS)
    assert counts.sum() == DRAWS
    probs = exact(logits, prompt, **params)
    p = chi_square_p(counts, probs)
    assert p > P_MIN, f"{case}: chi-square p = {p:.3g}"
    assert int((counts > 0).sum()) > 10  # a spread distribution: the test has something to tell apart
    wrong = exact(logits, prompt, **{**params, "temperature": params["temperature"] * 2})
    assert chi_square_p(counts, wrong) < P_MIN, "the test cannot tell a doubled temperature apart"


def test_a_seeded_request_gives_the_same_tokens_alone_and_in_a_batch(tiny_bundle):
    bundle = tiny_bundle("region")
    params = SamplingParams(max_new_tokens=10, do_sample=True, temperature=0.9, top_k=30, top_p=0.95,
                            repetition_penalty=1.2, seed=1234)
    image = rand_image(60, 44, 7)

    def run(engine, others: int, preempt_at: int | None = None) -> list[int]:
        rid = engine.add_request(image, "What is it?", params)
        for i in range(others):
            engine.add_request(rand_image(40 + i, 40, i), f"Question {i}?",
                               SamplingParams(max_new_tokens=12, do_sample=i % 2 == 0, seed=i, temperature=0.7))
        out = None
        while engine.has_unfinished():
            mine = engine._requests.get(rid)
            if preempt_at is not None and mine is not None and len(mine.generated) == preempt_at and mine.slot is not None:
                engine._preempt(mine)  # as a full cache would: it is recomputed from its tokens later
                preempt_at = None
            for event in engine.step():
                if isinstance(event, FinishEvent) and event.request == rid:
                    out = event.result.token_ids
        return out

    alone = run(Engine(bundle), 0)
    assert run(Engine(bundle, max_batch_size=32), 31) == alone
    assert run(Engine(bundle, max_batch_size=4), 9) == alone  # joined and left by others as it runs
    preempted = Engine(bundle, max_batch_size=8)
    assert run(preempted, 7, preempt_at=4) == alone
    assert preempted.num_preemptions == 1 and preempted.stats()["recomputed_tokens"] > 0
