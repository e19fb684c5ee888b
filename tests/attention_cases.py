"""Paged caches with scattered block tables and a per-query loop reference, for the attention op tests."""

from __future__ import annotations

import torch


def paged_case(lens, block_size, kv_heads, dim, gen, dtype=torch.float32, spare=3):
    """Caches (num_blocks, block_size, kv_heads, dim) with NaN everywhere no sequence holds a key,
    and block tables (B, M) in a scrambled order, padded with block 0."""
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + spare
    k = torch.full((num_blocks, block_size, kv_heads, dim), float("nan"))
    v = torch.full_like(k, float("nan"))
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    width = max(need) + 1
    tables = []
    for n, m in zip(lens, need):
        blocks = [order.pop() for _ in range(m)]
        for i, blk in enumerate(blocks):
            live = min(block_size, n - i * block_size)
            k[blk, :live] = torch.randn(live, kv_heads, dim, generator=gen)
            v[blk, :live] = torch.randn(live, kv_heads, dim, generator=gen)
        tables.append(blocks + [0] * (width - m))
    k[0] = 0.0  # the null block padding rows point at
    v[0] = 0.0
    return k.to(dtype), v.to(dtype), torch.tensor(tables), torch.tensor(lens)


def loop_attention(q, k, v, tables, lens, scale, positions):
    """Query i (heads, dim) of sequence rows[i] at position positions[i] attends to keys 0..positions[i],
    computed one query and one head at a time in float32. q (N, heads, dim); positions: list of (row, position)."""
    heads, kv_heads, block_size = q.shape[1], k.shape[2], k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32)
    for i, (row, pos) in enumerate(positions):
        blocks = tables[row, : -(-int(lens[row]) // block_size)]
        K = k[blocks].reshape(-1, kv_heads, k.shape[-1])[: pos + 1].float()
        V = v[blocks].reshape(-1, kv_heads, v.shape[-1])[: pos + 1].float()
        for h in range(heads):
            w = ((K[:, h * kv_heads // heads] @ q[i, h].float()) * scale).softmax(0)
            out[i, h] = w @ V[:, h * kv_heads // heads]
    return out


def rotate(q, cos, sin):
    half = q.shape[-1] // 2
    return q * cos[:, None] + torch.cat((-q[..., half:], q[..., :half]), -1) * sin[:, None]
