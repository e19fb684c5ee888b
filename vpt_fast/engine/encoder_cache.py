"""The encoder cache: vision-tower outputs (first images and crops) and re-encoding branch
features (DINOv2, SAM: the projectors' inputs) kept by key within a byte budget, so an image
or crop seen again skips its encoder even where no KV prefix can be reused (another question
before the same crop, a region asked for twice). Keys come from `prefix_cache` (an image's
contents, its box, the processor's settings). Projected re-encodings are never kept: in a
two-pass model they depend on the sequence's control vector.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class EncoderCache:
    """Tensors by key, the least recently used dropped first when the budget is exceeded; a
    budget of 0 keeps nothing."""

    def __init__(self, budget_bytes: int):
        if not isinstance(budget_bytes, int) or isinstance(budget_bytes, bool) or budget_bytes < 0:
            raise ValueError(f"the encoder cache budget must be an int >= 0 bytes, got {budget_bytes!r}")
        self.budget = budget_bytes
        self.bytes = 0
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.queries = 0  # lookups
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> torch.Tensor | None:
        if not self.budget:
            return None
        self.queries += 1
        value = self._entries.get(key)
        if value is not None:
            self.hits += 1
            self._entries.move_to_end(key)
        return value

    def put(self, key: bytes, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.budget or key in self._entries:
            return
        while self.bytes + size > self.budget:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= dropped.numel() * dropped.element_size()
        self._entries[key] = value
        self.bytes += size

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0
