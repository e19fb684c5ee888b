"""Decode steps over fixed buffers, captured as CUDA graphs per batch-size bucket.

A step's inputs (token ids, input-embedding overrides for action tokens, positions, the
slot each new key/value goes to, lengths and block tables) are copied into buffers sized
to the next bucket, in one host-to-device copy; padding rows write nowhere (slot -1) and
read the null block. The step itself never synchronises with the host, so on CUDA it is
captured once per bucket and replayed. On the CPU the same code runs uncaptured.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .cache import PagedKVCache
from .runner import Runner

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Buffers:
    def __init__(self, n: int, max_blocks: int, hidden: int, vocab: int, dtype: torch.dtype, device: torch.device):
        # one flat buffer, filled by one copy per step: five (n,) rows, then the (n, max_blocks) tables
        self.packed = torch.zeros(n * (5 + max_blocks), dtype=torch.long, device=device)
        self.tokens, self.position, self.slot_mapping, self.seq_lens, self.use_override = self.packed[: 5 * n].view(5, n)
        self.block_tables = self.packed[5 * n:].view(n, max_blocks)
        self.override = torch.zeros(n, hidden, dtype=dtype, device=device)
        self.hidden = torch.zeros(n, hidden, dtype=dtype, device=device)
        self.logits = torch.zeros(n, vocab, dtype=torch.float32, device=device)
        # the step's inputs on the host, filled in place and copied in one go (pinned on CUDA)
        self.host = torch.zeros(n * (5 + max_blocks), dtype=torch.long, pin_memory=device.type == "cuda")
        self.host_view = self.host.numpy()


class DecodeStep:
    """One token for each of up to `BUCKETS[-1]` sequences of a paged cache."""

    def __init__(self, runner: Runner, cache: PagedKVCache, max_blocks: int, use_graphs: bool):
        if use_graphs and runner.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.runner = runner
        self.cache = cache
        self.max_blocks = max_blocks
        self.use_graphs = use_graphs
        self.vocab = runner.lm_head.weight.shape[0]
        self._buffers: dict[int, _Buffers] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = None  # one memory pool for every bucket's graph: they never run at once
        self.captures = 0  # graphs captured so far

    def capture(self, max_batch_size: int) -> tuple[tuple[int, ...], float, int]:
        """Capture the graph of every bucket a batch of up to `max_batch_size` requests uses, the
        largest first (the smaller ones then fit in its pool), so that serving never stops to
        capture. Returns (buckets, seconds, bytes of device memory the graphs and their buffers
        took)."""
        if not self.use_graphs:
            raise RuntimeError("capture needs a DecodeStep built with use_graphs=True")
        device = self.runner.device
        buckets = tuple(b for b in BUCKETS if b <= self.bucket(max_batch_size))
        torch.cuda.synchronize(device)
        before, start = torch.cuda.memory_reserved(device), time.perf_counter()
        for n in reversed(buckets):
            self._graph(self._buffer(n), n)
        torch.cuda.synchronize(device)
        return buckets, time.perf_counter() - start, torch.cuda.memory_reserved(device) - before

    def _buffer(self, n: int) -> _Buffers:
        buf = self._buffers.get(n)
        if buf is None:
            buf = self._buffers[n] = _Buffers(n, self.max_blocks, self.runner.hidden_size, self.vocab, self.runner.dtype,
                                              self.runner.device)
        return buf

    def _graph(self, buf: _Buffers, n: int):
        graph = self._graphs.get(n)
        if graph is None:
            graph = self._graphs[n] = self._capture(buf)
            self.captures += 1
        return graph

    @staticmethod
    def bucket(n: int) -> int:
        for b in BUCKETS:
            if n <= b:
                return b
        raise ValueError(f"a decode step takes at most {BUCKETS[-1]} sequences, got {n}")

    def _body(self, buf: _Buffers, width: int | None = None) -> None:
        """The step; `width` narrows the block tables to the columns in use (uncaptured steps only:
        a captured step reads them all, its shapes fixed)."""
        embeds = self.runner.embed(buf.tokens)
        embeds = torch.where(buf.use_override.bool()[:, None], buf.override, embeds)
        tables = buf.block_tables if width is None else buf.block_tables[:, :width]
        hidden = self.runner.decode(embeds, buf.position[None].expand(3, -1), self.cache, buf.slot_mapping, tables,
                                    buf.seq_lens)
        buf.hidden.copy_(hidden)
        buf.logits.copy_(self.runner.logits(hidden))

    def _capture(self, buf: _Buffers) -> torch.cuda.CUDAGraph:
        self._fill_padding(buf, 0)  # warm-up and capture write nothing and read the null block
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compiles kernels and settles allocations outside the graph
                self._body(buf)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._body(buf)
        return graph

    @staticmethod
    def _fill_padding(buf: _Buffers, start: int) -> None:
        buf.tokens[start:] = 0
        buf.position[start:] = 0
        buf.slot_mapping[start:] = -1
        buf.seq_lens[start:] = 1
        buf.use_override[start:] = 0
        buf.block_tables[start:] = 0

    def __call__(self, tokens: list[int], overrides: list[torch.Tensor | None], positions: list[int],
                 slot_mapping: list[int], seq_lens: list[int], block_tables: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row: its id (or its input embedding in overrides[b]), its position, the
        cache slot its key/value go to, its sequence's length with it, and its block table (row b
        of block_tables, (B, max_blocks); entries past the length's blocks are not read).
        Returns (logits (B, vocab) float32, final hidden states (B, H)), fresh tensors."""
        B = len(tokens)
        n = self.bucket(B)
        buf = self._buffer(n)
        host = buf.host_view
        rows = host[: 5 * n].reshape(5, n)
        rows[0, :B], rows[1, :B], rows[2, :B], rows[3, :B] = tokens, positions, slot_mapping, seq_lens
        rows[4, :B] = [o is not None for o in overrides]
        rows[:, B:] = ((0,), (0,), (-1,), (1,), (0,))  # padding rows: write nowhere, read the null block
        tables = host[5 * n:].reshape(n, self.max_blocks)
        tables[:B] = block_tables
        tables[B:] = 0
        for b, o in enumerate(overrides):
            if o is not None:
                buf.override[b].copy_(o)
        graph = self._graph(buf, n) if self.use_graphs else None
        buf.packed.copy_(buf.host, non_blocking=True)
        if graph is not None:
            graph.replay()
        else:
            self._body(buf, -(-max(seq_lens) // self.cache.block_size))
        return buf.logits[:B].clone(), buf.hidden[:B].clone()
