"""Per-sequence perception state: what the sequence holds, what it generated, what it looked at.

The engine keeps, for each request, the token ids exactly as they sit in its KV
cache, the conversation turns they encode, and the positions bookkeeping needed to
roll back. When a round ends, the engine compares the conversation the two-round
reference would build next with what the cache holds: the longest common prefix
stays, the rest is rolled back and the new segment is spliced in (VPT_SPEC 9).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class PerceptionTrace:
    """What the model looked at in one perception."""

    kind: str  # "region", "clip", "dino" or "sam"
    cells: list[tuple[int, int, int, int]]  # region: (x0, y0, x1, y1) grid cells named by each block
    boxes: list[tuple[int, int, int, int]]  # pixel boxes of the original image shown again
    tokens_spliced: int  # new tokens written into the cache
    tokens_rolled_back: int  # cached tokens dropped because the next round re-reads them differently
    seconds: float  # wall time from the end of the round to the spliced segment in the cache


@dataclass
class GenerationResult:
    """One request's outcome. `token_ids` is everything generated; `round1_ids` and
    `answer_ids` split it as the two-round reference does."""

    token_ids: list[int]
    round1_ids: list[int]
    answer_ids: list[int]
    text: str
    finish_reason: str  # "stop", "length", "malformed", "unsupported:<kind>", "no_room", "error"
    trace: list[PerceptionTrace] = field(default_factory=list)
    perception: Any = None  # spec.PerceptionResult of the first round
    error: str | None = None
    logits: list[torch.Tensor] | None = None  # with return_logits: (vocab,) logits behind each of token_ids


@dataclass
class Segment:
    """Tokens to append to a sequence, with what their embeddings need."""

    ids: list[int]
    images: list[Any]  # capped PIL images for the <|image_pad|> runs, in order
    reencode: tuple[str, Any] | None = None  # (kind, encoder input, then features) for a re-encoding pad run
    first_image: int = 0  # index in the sequence's image list of the segment's first image


class SequenceState:
    """One request inside the engine."""

    def __init__(self, index: int, slot: int, original, first, user_turn: str, prompt_ids: list[int],
                 forced: list[int] | None, max_new_tokens: int, answer_max_new_tokens: int):
        self.index = index
        self.slot = slot
        self.original = original
        self.first = first
        self.turns: list[tuple[str, str]] = [("user", user_turn)]
        self.images: list[Any] = [first]  # every image of the conversation, in order
        self.boxes: list[tuple[int, int, int, int]] = [(0, 0, *original.size)]  # each image's box in the original
        self.device_image: torch.Tensor | None = None  # the original as uint8 (H, W, 3) on the device, when used
        self.features: list[torch.Tensor | None] = [None]  # their vision features once computed
        self.ids: list[int] = []  # tokens in the cache, in order
        self.prefix_max: list[int] = []  # max position over ids[: i + 1]
        self.prompt_ids = prompt_ids
        self.forced = forced
        self.round_limits = (max_new_tokens, answer_max_new_tokens)
        self.round = 0
        self.round_ids: list[int] = []
        self.generated: list[int] = []
        self.round1_ids: list[int] = []
        self.answer_ids: list[int] = []
        self.trace: list[PerceptionTrace] = []
        self.perception = None
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.logits: torch.Tensor | None = None  # next-token logits, pending a choice
        self.last_hidden: tuple[int, torch.Tensor] | None = None  # (index in ids, final hidden state)
        self.control: torch.Tensor | None = None  # control vector of the last action token fed
        self.round_end_time = 0.0

    # -- bookkeeping -------------------------------------------------------------------

    @property
    def next_position(self) -> int:
        return self.prefix_max[-1] + 1 if self.prefix_max else 0

    def appended(self, ids: list[int], positions: torch.Tensor) -> None:
        """Record tokens written to the cache with their (3, T) positions."""
        top = self.prefix_max[-1] if self.prefix_max else -1
        for m in positions.max(dim=0).values.tolist():
            top = max(top, m)
            self.prefix_max.append(top)
        self.ids.extend(ids)

    def rolled_back(self, length: int) -> None:
        del self.ids[length:]
        del self.prefix_max[length:]
        if self.last_hidden is not None and self.last_hidden[0] >= length:
            self.last_hidden = None

    @property
    def round_limit(self) -> int:
        return self.round_limits[0 if self.round == 0 else 1]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: str) -> None:
        self.finish_reason = reason
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


def count_image_runs(ids: list[int], image_pad: int) -> int:
    runs, prev = 0, None
    for t in ids:
        if t == image_pad and prev != image_pad:
            runs += 1
        prev = t
    return runs


__all__ = [
    "GenerationResult", "PerceptionTrace", "Segment", "SequenceState", "longest_common_prefix", "back_out_of_runs",
    "count_image_runs",
]
