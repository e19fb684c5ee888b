"""Decode steps over fixed buffers, captured as CUDA graphs per batch-size bucket.

A step's inputs (token ids, optional input-embedding overrides for action tokens,
positions, cache slots) are copied into buffers sized to the next bucket; rows past
the real batch point at the cache's scratch slot. The step itself reads lengths on
the device and never synchronises with the host, so on CUDA it is captured once per
bucket and replayed. On the CPU the same code runs uncaptured.
"""

from __future__ import annotations

import torch

from .cache import KVCache
from .runner import Runner

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _Buffers:
    def __init__(self, n: int, hidden: int, vocab: int, dtype: torch.dtype, device: torch.device):
        self.tokens = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(3, n, dtype=torch.long, device=device)
        self.slots = torch.zeros(n, dtype=torch.long, device=device)
        self.use_override = torch.zeros(n, dtype=torch.bool, device=device)
        self.override = torch.zeros(n, hidden, dtype=dtype, device=device)
        self.hidden = torch.zeros(n, hidden, dtype=dtype, device=device)
        self.logits = torch.zeros(n, vocab, dtype=torch.float32, device=device)


class DecodeStep:
    """One token for each of up to `cache.slots - 1` sequences (the last slot is scratch)."""

    def __init__(self, runner: Runner, cache: KVCache, use_graphs: bool):
        if use_graphs and runner.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.runner = runner
        self.cache = cache
        self.scratch = cache.slots - 1
        self._scratch_length = cache.lengths[self.scratch : self.scratch + 1]  # a view, reset on the device
        self.use_graphs = use_graphs
        self.vocab = runner.lm_head.weight.shape[0]
        self._buffers: dict[int, _Buffers] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}

    @staticmethod
    def bucket(n: int) -> int:
        for b in BUCKETS:
            if n <= b:
                return b
        raise ValueError(f"a decode step takes at most {BUCKETS[-1]} sequences, got {n}")

    def _body(self, buf: _Buffers) -> None:
        self._scratch_length.zero_()  # padding rows all write at the scratch slot's start (no host copy: capturable)
        embeds = self.runner.embed(buf.tokens)
        embeds = torch.where(buf.use_override[:, None], buf.override, embeds)
        hidden = self.runner.decode(embeds, buf.positions, self.cache, buf.slots)
        buf.hidden.copy_(hidden)
        buf.logits.copy_(self.runner.logits(hidden))

    def _capture(self, buf: _Buffers) -> torch.cuda.CUDAGraph:
        buf.slots.fill_(self.scratch)  # warm-up and capture touch only the scratch slot
        buf.use_override.zero_()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compiles kernels and settles allocations outside the graph
                self._body(buf)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._body(buf)
        return graph

    def __call__(self, tokens: list[int], overrides: list[torch.Tensor | None], positions: list[int],
                 slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits (B, vocab) float32, final hidden states (B, H)), fresh tensors."""
        B = len(tokens)
        if B > self.scratch:
            raise ValueError(f"{B} sequences for a cache of {self.scratch} slots")
        n = self.bucket(B)
        buf = self._buffers.get(n)
        if buf is None:
            buf = self._buffers[n] = _Buffers(n, self.runner.hidden_size, self.vocab, self.runner.dtype, self.runner.device)
        pad = n - B
        host = torch.tensor([tokens + [0] * pad, positions + [0] * pad, slots + [self.scratch] * pad,
                             [o is not None for o in overrides] + [False] * pad], dtype=torch.long)
        for b, o in enumerate(overrides):
            if o is not None:
                buf.override[b].copy_(o)
        graph = None
        if self.use_graphs:
            graph = self._graphs.get(n)
            if graph is None:
                graph = self._graphs[n] = self._capture(buf)
        host = host.to(self.runner.device, non_blocking=True)
        buf.tokens.copy_(host[0])
        buf.positions.copy_(host[1][None].expand(3, -1))
        buf.slots.copy_(host[2])
        buf.use_override.copy_(host[3].bool())
        if graph is not None:
            graph.replay()
        else:
            self._body(buf)
        return buf.logits[:B].clone(), buf.hidden[:B].clone()
