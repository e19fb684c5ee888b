"""Sampling parameters, request validation and next-token choice, shared by the reference
pipeline and the engine."""

from __future__ import annotations

import hashlib
import json
import math
import operator
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from . import _hf_compat


MIN_TEMPERATURE = 0.01
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 1000  # bounds of `stop` (the server takes OpenAI's 4)
MAX_LOGPROBS = 20  # OpenAI's bound of top_logprobs
MAX_N = 16


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates. Invalid values raise ValueError at construction.

    max_new_tokens bounds each round; answer_max_new_tokens (default: the same) the rounds
    after a perception. Greedy unless do_sample; then temperature (a positive value below
    MIN_TEMPERATURE is raised to it with a warning, as vLLM does), top_k and top_p shape the
    distribution (in that order, as transformers applies them) and `seed` seeds the request's
    own sampling noise, so its tokens do not depend on what else is batched (None: a fresh seed).
    max_perception_rounds: how many perceptions the request may make (1, as the published
    flow). return_logits keeps the logits behind every generated token (before any penalty).
    repetition_penalty: transformers' rule, before the rest: the logit of every token already
    in the sequence (prompt included) is divided by it when positive, multiplied when not.
    stop_token_ids: tokens that end a round as `<|im_end|>` does (e.g. a checkpoint's other
    end-of-sequence ids); a round always ends at `<|im_end|>`.
    stop: strings that end the request when the text of a round (special tokens left out)
    contains one, even split across tokens: the text ends before it (with it, when
    include_stop_str_in_output), the finish reason is "stop" and `stop_reason` names it; a
    round-1 text that holds one ends the request before any perception.
    presence_penalty / frequency_penalty: OpenAI's rule over the tokens generated in the
    current round (a round after a perception starts afresh, as the two-round flow's second
    generate does): the logit of a token generated c > 0 times so far is lowered by
    presence_penalty + c * frequency_penalty; in [-2, 2]. Applied after the repetition penalty.
    logprobs: None, or 0-20: each generated token's log-probability and that many most likely
    alternatives, from the model's raw distribution (before penalties, temperature and
    filtering: vLLM's default `logprobs_mode`).
    n: answers to the prompt (1-16), sharing its prefill; answer k > 0 samples with a seed
    derived from (seed, k) (`answer_seed`), answer 0 with the seed itself.
    structured: a `StructuredOutput` the answer must follow (see `engine.structured`).
    """

    max_new_tokens: int = 64
    answer_max_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    max_perception_rounds: int = 1
    return_logits: bool = False
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    n: int = 1
    structured: "StructuredOutput | None" = None

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "answer_max_new_tokens"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not _is_int(self.max_perception_rounds) or self.max_perception_rounds < 0:
            raise ValueError(f"max_perception_rounds must be a non-negative int, got {self.max_perception_rounds!r}")
        for name in ("do_sample", "return_logits"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be a positive number, got {t!r}")
        if t < MIN_TEMPERATURE:  # vLLM's rule: below it, logits / t overflow to inf and sampling fails
            warnings.warn(f"temperature {t!r} is below {MIN_TEMPERATURE}: raised to {MIN_TEMPERATURE}", stacklevel=3)
            object.__setattr__(self, "temperature", MIN_TEMPERATURE)
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {self.top_k!r}")
        p = self.top_p
        if p is not None and (not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None, got {p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise ValueError(f"seed must be an int in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] or None, got {self.seed!r}")
        r = self.repetition_penalty
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not math.isfinite(r) or r <= 0:
            raise ValueError(f"repetition_penalty must be a positive number, got {r!r}")
        stops = self.stop_token_ids
        if isinstance(stops, (str, bytes)) or not isinstance(stops, Sequence) or not all(_is_int(t) and t >= 0 for t in stops):
            raise ValueError(f"stop_token_ids must be a sequence of token ids, got {stops!r}")
        object.__setattr__(self, "stop_token_ids", tuple(stops))
        words = self.stop
        if isinstance(words, str):
            words = (words,)
        if not isinstance(words, Sequence) or not all(isinstance(w, str) and w for w in words):
            raise ValueError(f"stop must be a sequence of non-empty strings, got {self.stop!r}")
        if len(words) > MAX_STOP_STRINGS or any(len(w) > MAX_STOP_CHARS for w in words):
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters, "
                             f"got {len(words)} of up to {max(map(len, words))}")
        object.__setattr__(self, "stop", tuple(words))
        if not isinstance(self.include_stop_str_in_output, bool):
            raise ValueError(f"include_stop_str_in_output must be a bool, got {self.include_stop_str_in_output!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not -2 <= v <= 2:
                raise ValueError(f"{name} must be a number in [-2, 2], got {v!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None or an int in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be an int in [1, {MAX_N}], got {self.n!r}")
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise ValueError(f"structured must be a StructuredOutput or None, got {type(self.structured).__name__}")

    @property
    def answer_limit(self) -> int:
        return self.max_new_tokens if self.answer_max_new_tokens is None else self.answer_max_new_tokens

    @property
    def penalizes_counts(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0


def answer_seed(seed: int, k: int) -> int:
    """The sampling seed of answer k of a request with n > 1 answers: the seed itself for
    answer 0 (so it is the answer n = 1 gives), a hash of (seed, k) for the others."""
    if k == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{k}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


STRUCTURED_KINDS = ("json_object", "json_schema", "choice", "regex", "grammar")


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the answer's text: kind "json_object" (any JSON object; spec None),
    "json_schema" (spec: the schema, a dict or its JSON text), "choice" (spec: the allowed
    strings), "regex" (spec: a regular expression) or "grammar" (spec: an EBNF grammar, as
    xgrammar and vLLM read it)."""

    kind: str
    spec: Any = None

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise ValueError(f"structured output kind must be one of {', '.join(STRUCTURED_KINDS)}, got {self.kind!r}")
        spec = self.spec
        if self.kind == "json_object":
            if spec is not None:
                raise ValueError("a json_object structured output takes no spec")
        elif self.kind == "json_schema":
            if isinstance(spec, dict):
                try:
                    spec = json.dumps(spec, sort_keys=True)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"the JSON schema cannot be written as JSON: {e}") from None
            if not isinstance(spec, str) or not spec:
                raise ValueError(f"a json_schema structured output takes a schema (dict or JSON text), got {type(spec).__name__}")
        elif self.kind == "choice":
            if isinstance(spec, str) or not isinstance(spec, Sequence) or not spec \
                    or not all(isinstance(c, str) and c for c in spec):
                raise ValueError(f"a choice structured output takes a non-empty list of non-empty strings, got {spec!r}")
            spec = tuple(spec)
        elif not isinstance(spec, str) or not spec:
            raise ValueError(f"a {self.kind} structured output takes a non-empty string, got {type(spec).__name__}")
        object.__setattr__(self, "spec", spec)


def penalize_repetition(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """scores (vocab,) with transformers' repetition penalty on the token ids `seen` (1-D)."""
    if penalty == 1.0 or seen.numel() == 0:
        return scores
    picked = scores.gather(0, seen)
    return scores.scatter(0, seen, torch.where(picked < 0, picked * penalty, picked / penalty))


def sample(scores: torch.Tensor, do_sample: bool, top_k, top_p, generator, temperature: float = 1.0) -> torch.Tensor:
    """Next tokens (B,) from scores (B, vocab): argmax, or sampling after temperature, top-k and
    top-p as transformers applies them."""
    if not do_sample:
        return scores.argmax(-1)
    TopKLogitsWarper, TopPLogitsWarper = _hf_compat.top_k_top_p_warpers()
    if temperature != 1.0:
        scores = scores / temperature
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None and top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def check_batch(images, prompts, forced_tokens) -> list:
    """Check the shape of a call (one entry of images and one prompt per request, forced_tokens
    matching);
    returns forced_tokens as a list with one entry per request. What is wrong with a single
    request (its image, prompt or forced tokens) is left to the per-request checks."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be a list of str (one per request)")
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise TypeError("images must be a list with one entry per request (None, a path or PIL image, or a list of them)")
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} image entries for {len(prompts)} prompts: one entry (None, an image or a list "
                         f"of images) per request expected")
    if not prompts:
        raise ValueError("no requests given")
    if forced_tokens is None:
        return [None] * len(prompts)
    if isinstance(forced_tokens, (str, bytes)) or not isinstance(forced_tokens, Sequence):
        raise TypeError(f"forced_tokens must be a list with one entry (None or token ids) per request, "
                        f"got {type(forced_tokens).__name__}")
    if len(forced_tokens) != len(prompts):
        raise ValueError(f"forced_tokens has {len(forced_tokens)} entries for {len(prompts)} requests")
    return list(forced_tokens)


def check_forced(forced, vocab_size: int) -> list[int] | None:
    """One request's forced tokens as a list of ints in [0, vocab_size), or None."""
    if forced is None:
        return None
    if isinstance(forced, torch.Tensor):
        forced = forced.tolist()
    if isinstance(forced, (str, bytes)) or not isinstance(forced, Sequence):
        raise TypeError(f"forced tokens must be a list of token ids, got {type(forced).__name__}")
    out, bad = [], []
    for t in forced:
        try:
            value = None if isinstance(t, bool) else operator.index(t)
        except TypeError:
            value = None
        if value is None or not 0 <= value < vocab_size:
            bad.append(t)
        else:
            out.append(value)
    if bad:
        raise ValueError(f"forced tokens hold {bad[:5]}: token ids in [0, {vocab_size}) expected")
    return out
