"""Per-request state: what a request holds in the cache, what it generated, what it looked at.

A request's sequence is `ids`: every token of its conversation so far, in order, with
their M-RoPE positions. The first `num_cached` of them have their keys and values in the
cache, in the request's blocks; the rest are pending (a prompt not yet admitted, a
spliced perception segment, a token chosen but not yet fed, or everything after a
preemption) and go in with the next prefill or decode. Input embeddings that are not the
token's own (image features, re-encoded features, an action token's control vector) are
kept in `spans` by their start index, so a preempted request is recomputed from exactly
the same inputs.
"""

from __future__ import annotations

import copy
import enum
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..sampling import SamplingParams


@dataclass
class PerceptionTrace:
    """What the model looked at in one perception."""

    kind: str  # "region", "clip", "dino" or "sam"
    cells: list[tuple[int, int, int, int]]  # region: (x0, y0, x1, y1) grid cells named by each block
    boxes: list[tuple[int, int, int, int]]  # pixel boxes of the original image shown again
    tokens_spliced: int  # new tokens written into the cache
    tokens_rolled_back: int  # cached tokens dropped because the next round re-reads them differently
    seconds: float  # wall time from the end of the round to the spliced segment in the cache
    image: int = 0  # which of the request's images was looked at (its index; docs/vpt.md §7)

    def to_json(self, timing: bool = True) -> dict[str, Any]:
        """The trace as JSON-ready data (lists for the tuples); with timing, "ms" as well."""
        out = {"kind": self.kind, "image": self.image, "cells": [list(c) for c in self.cells],
               "boxes": [list(b) for b in self.boxes], "tokens_spliced": self.tokens_spliced,
               "tokens_rolled_back": self.tokens_rolled_back}
        if timing:
            out["ms"] = round(self.seconds * 1e3, 3)
        return out


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model's raw distribution, and the most
    likely tokens there (id, log-probability), most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class GenerationResult:
    """One request's outcome. `token_ids` is everything generated; `round1_ids` and
    `answer_ids` split it as the two-round reference does."""

    token_ids: list[int]
    round1_ids: list[int]
    answer_ids: list[int]
    text: str
    finish_reason: str  # "stop", "length", "malformed", "unsupported:<kind>", "no_room", "error", "abort"
    trace: list[PerceptionTrace] = field(default_factory=list)
    perception: Any = None  # spec.PerceptionResult of the first round
    error: str | None = None
    logits: list[torch.Tensor] | None = None  # with return_logits: (vocab,) logits behind each of token_ids
    prompt_tokens: int = 0  # tokens of the round-1 prompt
    # the whole conversation as it ends: the round-1 prompt, and after a perception the
    # conversation the two-round flow's round 2 reads, then the answer (its first
    # prompt_tokens ids are the round-1 prompt)
    sequence_ids: list[int] = field(default_factory=list)
    index: int = 0  # which of the request's n answers
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it ("stop" only)
    logprobs: list[TokenLogprob] | None = None  # with SamplingParams.logprobs: one per token of token_ids


@dataclass
class TokenEvent:
    request: int
    token_id: int
    round: int  # 0 for round 1, k after k perceptions
    index: int = 0  # which of the request's n answers
    logprob: TokenLogprob | None = None  # with SamplingParams.logprobs


@dataclass
class PerceptionEvent:
    request: int
    trace: PerceptionTrace
    index: int = 0


@dataclass
class FinishEvent:
    """One answer of a request finished; `final` when it was the request's last (n > 1 answers
    finish one by one, each with its index)."""

    request: int
    result: GenerationResult
    index: int = 0
    final: bool = True


Event = TokenEvent | PerceptionEvent | FinishEvent


class Status(enum.Enum):
    WAITING = "waiting"  # queued for admission (new, or preempted and to be recomputed)
    RUNNING = "running"  # holds blocks
    FINISHED = "finished"  # its FinishEvent is due or given


class Positions:
    """M-RoPE positions (3, n) of a growing sequence, with the running maximum each prefix
    reaches; kept in a host array, so a decode step's text position is a plain int."""

    def __init__(self):
        self._data = np.zeros((3, 64), dtype=np.int64)
        self._top = np.zeros(64, dtype=np.int64)  # max position over the first i + 1 tokens
        self._n = 0

    def __len__(self) -> int:
        return self._n

    @property
    def next(self) -> int:
        """The position a text token appended now gets."""
        return int(self._top[self._n - 1]) + 1 if self._n else 0

    def _room(self, n: int) -> None:
        if n > self._data.shape[1]:
            size = max(2 * self._data.shape[1], n)
            data, top = np.zeros((3, size), dtype=np.int64), np.zeros(size, dtype=np.int64)
            data[:, : self._n], top[: self._n] = self._data[:, : self._n], self._top[: self._n]
            self._data, self._top = data, top

    def extend(self, positions: torch.Tensor) -> None:
        new = positions.shape[1]
        if new == 0:
            return
        n = self._n
        self._room(n + new)
        values = positions.numpy() if isinstance(positions, torch.Tensor) else np.asarray(positions)
        self._data[:, n : n + new] = values
        running = np.maximum.accumulate(values.max(axis=0))
        self._top[n : n + new] = np.maximum(running, self._top[n - 1] if n else -1)
        self._n = n + new

    def append_text(self) -> int:
        p = self.next
        n = self._n
        self._room(n + 1)
        self._data[:, n] = p
        self._top[n] = p
        self._n = n + 1
        return p

    def at(self, i: int) -> int:
        """The (temporal) position of text token i."""
        return int(self._data[0, i])

    def truncate(self, n: int) -> None:
        self._n = min(self._n, n)

    def window(self, start: int, stop: int) -> torch.Tensor:
        return torch.from_numpy(self._data[:, start:stop].copy())


@dataclass
class PendingReencode:
    """A re-encoding pad run waiting for its features: the branch and its encoder input."""

    kind: str
    model_input: Any
    key: bytes | None = None  # of the encoder's output in the encoder cache (`prefix_cache.branch_key`)
    features: Any = None  # the branch's output once computed (a chunked prefill may reach the pads later)


@dataclass
class PendingTrace:
    """A perception spliced into `ids`, reported once its segment is in the cache."""

    kind: str
    cells: list[tuple[int, int, int, int]]
    boxes: list[tuple[int, int, int, int]]
    tokens: int
    rolled_back: int
    round_end_time: float
    image: int  # the index of the request's image looked at


class Request:
    """One request inside the engine."""

    def __init__(self, request_id: int, params: SamplingParams, forced: list[int] | None, turn=None,
                 positions: torch.Tensor | None = None, *, name: str = "", error: str | None = None):
        """turn: the checked prompt (`prompt.FirstTurn`) and positions (3, n) its M-RoPE positions;
        without them the request has failed its checks with `error`."""
        self.id = request_id
        self.name = name or f"request {request_id}"  # how messages name it
        self.group = request_id  # the id its events carry: its own, or that of the request it answers with
        self.index = 0  # which of the group's n answers
        self.unforked = params.n - 1  # answers still to fork from it when its prefill ends (n > 1)
        self.params = params
        self.forced = forced
        self.status = Status.WAITING
        self.seed = 0  # of its sampling noise: the one given, or drawn when the request is made
        self.slot: int | None = None  # its row in the sampler's arrays while it runs
        self.unseen = -1  # the token fed last, not yet in the sampler's seen mask (-1: none)
        self.recompute = False  # preempted: its next prefill computes again what it had
        self.counted = False  # its prompt is in the engine's stats
        self.prefill_kind: str | None = None  # the stats counter its prefill in progress adds to
        # the conversation
        self.turn = turn  # prompt.FirstTurn, or None when the request failed its checks
        # the conversation's turns; None when the prompt came as token ids that are not one
        self.turns: list[tuple[str, str]] | None = list(turn.turns) if turn is not None and turn.turns is not None else None
        prompt_images = list(turn.images) if turn is not None else []
        self.images: list[Any] = prompt_images  # every image of the conversation, in order (crops after the prompt's)
        # the original each image is cut from (its index in turn.originals), and the box it is cut by
        self.sources: list[int] = list(range(len(prompt_images)))
        self.boxes: list[tuple[int, int, int, int]] = [(0, 0, *o.size) for o in turn.originals] if turn is not None else []
        self.device_images: dict[int, torch.Tensor] = {}  # originals as uint8 (H, W, 3) on the device, when used
        # content keys (`prefix_cache`): of each original, and of every image in `images`
        self.original_keys: list[bytes] = []
        self.image_keys: list[bytes] = []
        # prefix caching: hashes of the full blocks of `ids` (None: never shared), the image runs
        # begun in them (starts; and the count up to each block), and how many are published
        self.block_hashes: list[bytes | None] = []
        self.block_runs: list[int] = []
        self.run_starts: list[int] = []
        self.published = 0
        self.coming: list[bytes] = []  # hashes of blocks it computes that others wait for
        # the sequence and the cache
        self.ids: list[int] = []
        self.tail: list[int] = []  # the token that ended the sequence's last round, never fed
        self.positions = Positions()
        self.spans: dict[int, torch.Tensor] = {}  # start index -> (n, H) input embeddings not the tokens' own
        self.num_cached = 0
        self.blocks: list[int] = []
        self.pending_reencode: PendingReencode | None = None
        self.pending_trace: PendingTrace | None = None
        self.control: torch.Tensor | None = None  # control vector of the last action token
        self.last_hidden: tuple[int, torch.Tensor] | None = None  # (index in ids, final hidden state)
        self.logits: torch.Tensor | None = None  # next-token logits, pending a choice
        # what it generated
        self.round = 0
        self.round_ids: list[int] = []
        self.generated: list[int] = []
        self.round1_ids: list[int] = []
        self.answer_ids: list[int] = []
        self.trace: list[PerceptionTrace] = []
        self.perception = None
        self.finish_reason: str | None = "error" if error is not None else None
        self.error = error
        self.logits_log: list[torch.Tensor] | None = [] if params.return_logits else None
        self.logprobs_log: list[Any] | None = [] if params.logprobs is not None else None  # TokenLogprob each
        self.constraint: Any = None  # structured.Constraint, with params.structured
        self.stop_text: Any = None  # text.IncrementalText of the round, with params.stop
        self.stop_reason: str | int | None = None
        self.round_end_time = 0.0
        if turn is not None:
            self.append(turn.ids, positions)

    def fork(self, request_id: int, index: int, seed: int) -> "Request":
        """Answer `index` of this request's group: a copy of its state now (sequence, cache
        bookkeeping, what it generated) that goes on with its own seed. Blocks are copied as a
        list: the caller takes its holds on them."""
        new = copy.copy(self)
        new.id, new.index, new.seed, new.unforked = request_id, index, seed, 0
        new.name = f"{self.name} (answer {index})"
        for name in ("turns", "images", "sources", "boxes", "original_keys", "image_keys", "block_hashes", "block_runs",
                     "run_starts", "ids", "tail", "blocks", "round_ids", "generated", "round1_ids", "answer_ids", "trace",
                     "logits_log", "logprobs_log"):
            value = getattr(self, name)
            setattr(new, name, list(value) if value is not None else None)
        new.spans = dict(self.spans)
        new.device_images = dict(self.device_images)
        new.coming = []
        new.positions = copy.deepcopy(self.positions)
        new.slot = None
        if self.constraint is not None:
            new.constraint = self.constraint.fork()
        if self.stop_text is not None:
            new.stop_text = self.stop_text.copy()
        return new

    # -- the sequence --------------------------------------------------------------------

    def append(self, ids: list[int], positions: torch.Tensor | None) -> None:
        """Add tokens (pending until fed); positions (3, n), or None for text after the sequence."""
        if positions is None:
            start = self.positions.next
            positions = torch.arange(start, start + len(ids)).expand(3, -1)
        self.tail = []
        self.ids.extend(ids)
        self.positions.extend(positions)

    def append_token(self, token: int, embedding: torch.Tensor | None) -> None:
        """Add one generated token, with its input embedding when it is not the token's own."""
        if embedding is not None:
            self.spans[len(self.ids)] = embedding[None]
        self.tail = []
        self.ids.append(token)
        self.positions.append_text()

    def truncate(self, length: int) -> None:
        """Forget everything from index `length` on (spans must not straddle the cut)."""
        for start in [s for s in self.spans if s + self.spans[s].shape[0] > length]:
            if start < length:
                raise RuntimeError(f"request {self.id}: a cut at {length} falls inside the run at {start}")
            del self.spans[start]
        del self.ids[length:]
        self.positions.truncate(length)
        self.num_cached = min(self.num_cached, length)
        if self.last_hidden is not None and self.last_hidden[0] >= length:
            self.last_hidden = None

    def control_before(self, index: int) -> torch.Tensor:
        """The control vector of the action token at `index` (docs/vpt.md §5): the final hidden
        state of the token before it, which the engine has from feeding that token."""
        if self.last_hidden is None or self.last_hidden[0] != index - 1:
            raise RuntimeError(f"request {self.id}: no hidden state for the token before the action token at {index}")
        return self.last_hidden[1]

    @property
    def pending(self) -> int:
        return len(self.ids) - self.num_cached

    # -- rounds --------------------------------------------------------------------------

    @property
    def round_limit(self) -> int:
        return self.params.max_new_tokens if self.round == 0 else self.params.answer_limit

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: str, error: str | None = None) -> None:
        self.finish_reason = reason
        if error is not None:
            self.error = error
        self.logits = None

    def end_round(self) -> list[int]:
        """Close the current round and return the ids it generated."""
        ids = self.round_ids
        if self.round == 0:
            self.round1_ids = list(ids)
        else:
            self.answer_ids = list(ids)
        self.round_ids = []
        self.round_end_time = time.perf_counter()
        return ids


def longest_common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def back_out_of_runs(ids: list[int], cut: int, run_tokens: set[int]) -> int:
    """Move a cut point back to the start of a visual-token run it falls inside."""
    while 0 < cut < len(ids) and ids[cut] in run_tokens and ids[cut - 1] in run_tokens:
        cut -= 1
    return cut
