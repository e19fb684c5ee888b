"""The engine's paged KV cache: fixed-size blocks, a free list, block tables per request.

Layout per layer: [num_blocks, block_size, kv_heads, head_dim], vLLM's paged layout, so
`ops.kv_splice` writes into it with flat slots block * block_size + offset and the
attention ops read it through block tables. A request holds a list of blocks (its block
table) that grows as its sequence does and shrinks on rollback; blocks go back to the free
list at finish, abort, preemption and rollback. Block 0 is never handed out: it is the
null block that padding rows of a captured decode step point at (never written, so it
stays zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class OutOfBlocks(RuntimeError):
    """More blocks were asked for than are free."""


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        if num_blocks < 2 or block_size < 1:
            raise ValueError(f"a paged cache needs at least 2 blocks (one is the null block) of at least one token, "
                             f"got num_blocks={num_blocks} block_size={block_size}")
        shape = (num_layers, num_blocks, block_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, 0, -1))  # a stack: the most recently freed block is reused first

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def capacity(self) -> int:
        """Tokens the cache can hold, all requests together."""
        return self.usable_blocks * self.block_size

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.usable_blocks - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"{n} blocks asked for, {len(self._free)} free")
        taken = self._free[len(self._free) - n:]
        del self._free[len(self._free) - n:]
        return taken[::-1]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

    def reset(self) -> None:
        """Every block free again (the requests holding them are gone)."""
        self._free = list(range(self.num_blocks - 1, 0, -1))

    def slots(self, blocks: list[int], start: int, stop: int) -> list[int]:
        """Flat slots of sequence positions start .. stop - 1 of a request holding `blocks`."""
        bs = self.block_size
        return [blocks[i // bs] * bs + i % bs for i in range(start, stop)]


@dataclass(frozen=True)
class SequenceBound:
    """The most tokens one sequence may hold: max_seq_len, or what the whole KV cache holds when
    that is less; str() names it for messages."""

    max_seq_len: int
    capacity: int

    @property
    def tokens(self) -> int:
        return min(self.max_seq_len, self.capacity)

    def __str__(self) -> str:
        if self.tokens == self.max_seq_len:
            return f"max_seq_len {self.max_seq_len}"
        return f"what the KV cache holds ({self.capacity} tokens)"
