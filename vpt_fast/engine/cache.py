"""The engine's KV cache: one slot per sequence, lengths held on the device.

Layout per layer: [slots, max_len, kv_heads, head_dim], i.e. a paged cache whose
block size is the slot size, so `ops.kv_splice` writes into it with flat slots
slot * max_len + position. Appending a segment is a splice at the slot's length;
rolling back is setting the length (the stale entries are overwritten later and
never read, as attention only looks below the length).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, slots: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        if slots < 1 or max_len < 1:
            raise ValueError(f"a cache needs at least one slot and one position, got slots={slots} max_len={max_len}")
        shape = (num_layers, slots, max_len, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.max_len = max_len
        self.slots = slots

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def length(self, slot: int) -> int:
        return int(self.lengths[slot])

    def rollback(self, slot: int, length: int) -> None:
        """Forget everything of `slot` from position `length` on."""
        current = self.length(slot)
        if not 0 <= length <= current:
            raise ValueError(f"rollback of slot {slot} to {length}: must be within [0, {current}]")
        self.lengths[slot] = length
