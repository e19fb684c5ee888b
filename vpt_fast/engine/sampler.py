"""The next token of every running request, chosen in a fixed number of device ops.

Each running request holds a slot. A slot's sampling settings (temperature, top-k, top-p,
repetition penalty, greedy or not, seed) are written to device arrays once, when the request is
admitted; the tokens a penalized request has seen are a (slots, vocab) mask on the device, set in
full when its sequence is (re)filled and one token a step after that. A step then reads, for its
rows, the slot, the request's sampling step, a forced token (or -1) and the token fed last, in
one host-to-device copy, and answers the chosen tokens with a flag per row saying whether its
logits were finite, in one device-to-host copy.

A structured-output row's logits are first masked by its grammar's bitmask (see
`structured`). The distribution is then transformers': the repetition penalty
(RepetitionPenaltyLogitsProcessor's rule), OpenAI's presence and frequency penalties over the
round's generated tokens (counted per slot on the device, as the seen mask is), then
temperature, top-k and top-p as TemperatureLogitsWarper, TopKLogitsWarper and
TopPLogitsWarper apply them. Sampled rows take the argmax of the filtered logits plus Gumbel
noise, which draws from their softmax; the noise of a row is a hash of (seed, step, token id),
so a request's tokens depend on its own seed and nothing else: not on what else is batched, nor
on a preemption. Greedy rows take the exact argmax of the penalized logits. Rows that ask for
log-probabilities get them from the raw logits (vLLM's default, "raw_logprobs"): the chosen
token's and the most likely ones', in the same device-to-host copy as the tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from ..sampling import SamplingParams
from .structured import unpack

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) of int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, token_hash: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise (B, V) float32 from int64 seeds (B,), steps (B,) and the hashed token ids
    (V,): one independent draw per (seed, step, token), the same on every device and batch."""
    lo, hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    key = _mix32(lo ^ _mix32(hi ^ _mix32(steps & _MASK32)))
    bits = _mix32(key[:, None] ^ token_hash[None, :]) >> 8  # 24 random bits
    u = (bits.to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1), never 0 or 1
    return -torch.log(-torch.log(u))


class BatchSampler:
    """Sampling state of `slots` running requests over a vocabulary of `vocab` tokens."""

    def __init__(self, slots: int, vocab: int, device: torch.device):
        self.slots, self.vocab, self.device = slots, vocab, device
        # host copies of each slot's settings (written at admission) ...
        self.temperature = np.ones(slots, dtype=np.float32)
        self.top_k = np.zeros(slots, dtype=np.int64)  # 0: off
        self.top_p = np.ones(slots, dtype=np.float32)
        self.penalty = np.ones(slots, dtype=np.float32)
        self.presence = np.zeros(slots, dtype=np.float32)
        self.frequency = np.zeros(slots, dtype=np.float32)
        self.do_sample = np.zeros(slots, dtype=bool)
        self.seed = np.zeros(slots, dtype=np.int64)
        # ... and the device ones the steps read
        # temperature, top_p, repetition penalty, presence penalty, frequency penalty
        self._floats = torch.ones(5, slots, dtype=torch.float32, device=device)
        self._ints = torch.zeros(3, slots, dtype=torch.long, device=device)  # top_k, do_sample, seed
        self.seen = torch.zeros(slots, vocab, dtype=torch.bool, device=device)
        self.counts: torch.Tensor | None = None  # (slots, vocab) int32 tokens of the round, made when first needed
        self._token_hash = _mix32(torch.arange(vocab, dtype=torch.long, device=device) * 0x9E3779B1 & _MASK32)
        self._free = list(range(slots - 1, -1, -1))

    # ------------------------------------------------------------------ slots

    def take(self, params: SamplingParams, seed: int) -> int:
        """A slot for a request with these settings (its seed given, as the request keeps it)."""
        slot = self._free.pop()
        self.temperature[slot] = params.temperature if params.do_sample else 1.0
        self.top_k[slot] = (params.top_k or 0) if params.do_sample else 0
        self.top_p[slot] = (params.top_p if params.top_p is not None else 1.0) if params.do_sample else 1.0
        self.penalty[slot] = params.repetition_penalty
        self.presence[slot] = params.presence_penalty
        self.frequency[slot] = params.frequency_penalty
        if params.penalizes_counts and self.counts is None:
            self.counts = torch.zeros(self.slots, self.vocab, dtype=torch.int32, device=self.device)
        self.do_sample[slot] = params.do_sample
        self.seed[slot] = seed if seed < 2**63 else seed - 2**64  # int64 bits of a seed in [-2^63, 2^64)
        floats = torch.tensor([self.temperature[slot], self.top_p[slot], self.penalty[slot], self.presence[slot],
                               self.frequency[slot]], dtype=torch.float32)
        ints = torch.tensor([self.top_k[slot], int(self.do_sample[slot]), self.seed[slot]], dtype=torch.long)
        self._floats[:, slot].copy_(floats.to(self.device, non_blocking=True))
        self._ints[:, slot].copy_(ints.to(self.device, non_blocking=True))
        return slot

    def give_back(self, slot: int) -> None:
        self._free.append(slot)

    def reset(self) -> None:
        """Every slot free (the engine dropped all its requests)."""
        self._free = list(range(self.slots - 1, -1, -1))

    def _counted(self, slot: int) -> bool:
        return bool(self.presence[slot] != 0 or self.frequency[slot] != 0)

    def fill_seen(self, slot: int, ids: list[int], round_ids: list[int]) -> None:
        """What a penalized slot has seen, in full (after a prefill changed it): the tokens its
        sequence holds (repetition penalty) and the tokens its round generated so far
        (presence and frequency penalties)."""
        if self.penalty[slot] != 1.0:
            self.seen[slot].zero_()
            self.seen[slot, torch.tensor(ids, dtype=torch.long).to(self.device, non_blocking=True)] = True
        if self._counted(slot):
            self.counts[slot].zero_()
            if round_ids:
                tokens = torch.tensor(round_ids, dtype=torch.long).to(self.device, non_blocking=True)
                self.counts[slot].index_add_(0, tokens, torch.ones_like(tokens, dtype=torch.int32))

    # ------------------------------------------------------------------ a step

    def choose(self, logits: torch.Tensor, slots: list[int], steps: list[int], forced: list[int], last: list[int],
               allowed: torch.Tensor | None = None, logprobs: int = -1,
               alternative: list[int] | None = None) -> tuple[list[int], list[bool], "Logprobs | None"]:
        """Tokens for rows of `logits` (B, vocab) float32: row b is slot slots[b] at its sampling
        step steps[b]; forced[b] >= 0 is taken as it is; last[b] is the token fed since the slot's
        seen mask was last written (-1: none). allowed: (B, words) int32 bitmasks of the tokens
        each row may take (-1 words: all; see `structured`). logprobs >= 0: also the raw
        log-probabilities of each row's chosen token, of alternative[b] (a token the caller may
        put in its place; -1: none) and of the `logprobs` most likely tokens. Returns (tokens,
        finite, Logprobs or None) with finite[b] False where row b's logits hold NaN or inf (its
        token is then meaningless)."""
        index = np.asarray(slots, dtype=np.int64)
        penalized = bool((self.penalty[index] != 1.0).any())
        counted = bool((self.presence[index] != 0).any() or (self.frequency[index] != 0).any())
        sampled = bool(self.do_sample[index].any())
        filtered = sampled and bool((self.top_k[index] > 0).any() or (self.top_p[index] < 1.0).any())
        host = torch.tensor([slots, steps, forced, last], dtype=torch.long)
        rows, step, force, fed = host.to(self.device, non_blocking=True)
        floats, ints = self._floats[:, rows], self._ints[:, rows]
        temperature, top_p, penalty, presence, frequency = floats
        top_k, do_sample, seed = ints
        scores = logits
        if allowed is not None:
            scores = scores.masked_fill(~unpack(allowed.to(self.device, non_blocking=True), scores.shape[-1]),
                                        float("-inf"))
        if penalized:
            # mark the tokens fed since (rows are distinct slots; -1 marks nothing), with no host sync
            fed_at = (rows, fed.clamp(min=0))
            self.seen[fed_at] = self.seen[fed_at] | (fed >= 0)
            seen = self.seen[rows] & (penalty != 1.0)[:, None]
            pen = penalty[:, None]
            scores = torch.where(seen, torch.where(scores < 0, scores * pen, scores / pen), scores)
        if counted:
            fed_at = (rows, fed.clamp(min=0))
            self.counts[fed_at] = self.counts[fed_at] + (fed >= 0).int()
            c = self.counts[rows].float()
            scores = scores - c * frequency[:, None] - (c > 0).float() * presence[:, None]
        finite = torch.isfinite(logits).all(-1)
        token = scores.argmax(-1)
        if sampled:
            scaled = scores / temperature[:, None]
            if filtered:
                scaled = _top_k_top_p(scaled, top_k, top_p)
            noisy = scaled + gumbel_noise(seed, step, self._token_hash)
            token = torch.where(do_sample.bool(), noisy.argmax(-1), token)
        token = torch.where(force >= 0, force, token)
        tokens, ok = torch.stack([token, finite.long()]).tolist()
        found = None
        if logprobs >= 0:
            raw = logits.float().log_softmax(-1)
            alt = torch.tensor(alternative or [-1] * len(slots), dtype=torch.long).to(self.device, non_blocking=True)
            picked = torch.stack([raw.gather(1, token[:, None])[:, 0], raw.gather(1, alt.clamp(min=0)[:, None])[:, 0]])
            top = raw.topk(min(logprobs, raw.shape[-1]), dim=-1) if logprobs else None
            chosen, other = picked.tolist()
            found = Logprobs(chosen, other, top.indices.tolist() if top is not None else [[] for _ in slots],
                             top.values.tolist() if top is not None else [[] for _ in slots])
        return tokens, [bool(f) for f in ok], found


class Logprobs:
    """Log-probabilities of a step's rows: of the chosen token, of the alternative asked for,
    and the top ones (ids and values, most likely first)."""

    __slots__ = ("chosen", "alternative", "top_ids", "top_values")

    def __init__(self, chosen: list[float], alternative: list[float], top_ids: list[list[int]],
                 top_values: list[list[float]]):
        self.chosen, self.alternative, self.top_ids, self.top_values = chosen, alternative, top_ids, top_values


def _top_k_top_p(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """transformers' TopKLogitsWarper then TopPLogitsWarper, per row (top_k 0 and top_p 1: off)."""
    vocab = scores.shape[-1]
    ascending, order = scores.sort(dim=-1)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    kth = ascending.gather(1, (vocab - k)[:, None])  # the k-th largest; ties with it are kept
    ascending = ascending.masked_fill(ascending < kth, float("-inf"))
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)[:, None]
    remove[:, -1] = False  # min_tokens_to_keep = 1
    ascending = ascending.masked_fill(remove, float("-inf"))
    return torch.empty_like(scores).scatter_(1, order, ascending)
