"""The engine's paged KV cache: fixed-size blocks, a free list, block tables per request.

Layout per layer: [num_blocks, block_size, kv_heads, head_dim], vLLM's paged layout, so
`ops.kv_splice` writes into it with flat slots block * block_size + offset and the
attention ops read it through block tables. A request holds a list of blocks (its block
table) that grows as its sequence does and shrinks on rollback; blocks are given back at
finish, abort, preemption and rollback. Block 0 is never handed out: it is the null block
that padding rows of a captured decode step point at (never written, so it stays zero).

Blocks are counted by reference: a full block whose contents are known by a hash (see
`prefix_cache.py`) may be held by several requests at once and is never written again. A
block no request holds is free: a hashed one stays findable by its hash (and keeps its
contents) until it is handed out again, the least recently released first, after every
block without a hash.
"""

from __future__ import annotations

from collections import OrderedDict
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
        self.reset()

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def capacity(self) -> int:
        """Tokens the cache can hold, all requests together."""
        return self.usable_blocks * self.block_size

    @property
    def num_free(self) -> int:
        """Blocks no request holds (those cached by hash included: they are handed out when needed)."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached_free(self) -> int:
        """Free blocks still findable by their hash."""
        return len(self._cached)

    @property
    def num_used(self) -> int:
        return self.usable_blocks - self.num_free

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]

    def copy_block(self, src: int, dst: int) -> None:
        """Write block src's keys and values, every layer, into block dst (a partial block of a
        sequence that forks: each branch writes its own)."""
        self.k[:, dst].copy_(self.k[:, src])
        self.v[:, dst].copy_(self.v[:, src])

    def allocate(self, n: int) -> list[int]:
        """n blocks for one holder: blocks without a hash first (the most recently freed), then
        the least recently released cached ones, whose hashes are forgotten."""
        if n > self.num_free:
            raise OutOfBlocks(f"{n} blocks asked for, {self.num_free} free")
        plain = min(n, len(self._free))
        taken = self._free[len(self._free) - plain:][::-1]
        del self._free[len(self._free) - plain:]
        for _ in range(n - plain):
            block, _ = self._cached.popitem(last=False)
            del self._by_hash[self._hash_of.pop(block)]
            taken.append(block)
        for block in taken:
            self._refs[block] = 1
        return taken

    def release(self, blocks: list[int]) -> None:
        """One holder gives `blocks` back (in table order); a block nobody holds any more is free.
        Cached ones are released last block first, so a sequence's tail is handed out before
        its head (heads are what other requests share)."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            if self._refs[block] < 0:
                raise RuntimeError(f"block {block} released more times than it was taken")
            if block in self._hash_of:
                self._cached[block] = None
            else:
                self._free.append(block)

    def reset(self) -> None:
        """Every block free again and nothing cached (the requests holding them are gone)."""
        self._free = list(range(self.num_blocks - 1, 0, -1))  # a stack: the most recently freed block is reused first
        self._refs = [0] * self.num_blocks
        self._cached: OrderedDict[int, None] = OrderedDict()  # free blocks with a hash, least recently released first
        self._hash_of: dict[int, bytes] = {}
        self._by_hash: dict[bytes, int] = {}

    # -- blocks known by hash (prefix caching) ------------------------------------------

    def find(self, block_hash: bytes) -> int | None:
        """The block holding the contents known by `block_hash`, if one does."""
        return self._by_hash.get(block_hash)

    def share(self, block: int) -> None:
        """One more holder for a block found by its hash."""
        if self._refs[block] == 0:
            del self._cached[block]
        self._refs[block] += 1

    def publish(self, block: int, block_hash: bytes) -> None:
        """Make a full, written block findable by `block_hash`. When another block already holds
        those contents, this one stays private (both hold the same keys and values)."""
        if block_hash not in self._by_hash and block not in self._hash_of:
            self._by_hash[block_hash] = block
            self._hash_of[block] = block_hash

    def holders(self, block: int) -> int:
        return self._refs[block]

    def is_published(self, block: int) -> bool:
        return block in self._hash_of

    def unpublish(self, block: int) -> None:
        """Forget a block's hash: its only holder is about to write into it."""
        block_hash = self._hash_of.pop(block, None)
        if block_hash is not None:
            del self._by_hash[block_hash]

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
