"""prefill_attention: causal attention of a ragged batch of new tokens over a paged KV cache.

The new tokens of sequence b are q[cu_seqlens[b]:cu_seqlens[b + 1]]: the last n_b of its
seq_lens[b] tokens, whose keys and values are already in the cache (written by
`kv_splice`). New token j sits at position seq_lens[b] - n_b + j and attends to every key
up to and including its own, read in place through the block table (no gather, no copy
for grouped-query heads in the Triton kernel). This is how a prompt, a spliced
perception segment or a recomputed sequence is appended after what the cache holds.
The op is `torch.ops.vpt_fast.prefill_attention`. Backends: torch
(`prefill_attention_torch`, the definition) and triton (`vpt_fast.kernels.prefill_attention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _registry
from .decode_attention import check_paged

OP = "prefill_attention"


def prefill_attention_torch(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens, scale: float,
                            max_new: int = 0) -> torch.Tensor:
    """q (N, heads, D) already rotated; caches (num_blocks, block_size, kv_heads, D); block_tables (B, M);
    seq_lens (B,) lengths including the new tokens; cu_seqlens (B + 1,) -> (N, heads, D). max_new (the
    most new tokens of one sequence) sizes the Triton kernel's grid; the definition does not need it."""
    heads, kv_heads, block_size = q.shape[1], k_cache.shape[2], k_cache.shape[1]
    out = torch.empty_like(q)
    for b, (a, z) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        n, total = z - a, int(seq_lens[b])
        if n == 0:
            continue
        blocks = block_tables[b, : -(-total // block_size)].long()
        K = k_cache[blocks].reshape(-1, kv_heads, k_cache.shape[-1])[:total].transpose(0, 1)  # (kv_heads, total, D)
        V = v_cache[blocks].reshape(-1, kv_heads, v_cache.shape[-1])[:total].transpose(0, 1)
        if heads != kv_heads:
            K = K.repeat_interleave(heads // kv_heads, dim=0)
            V = V.repeat_interleave(heads // kv_heads, dim=0)
        rows = torch.arange(total - n, total, device=q.device)
        mask = torch.arange(total, device=q.device)[None, :] <= rows[:, None]  # (n, total)
        o = F.scaled_dot_product_attention(q[a:z].transpose(0, 1), K, V, attn_mask=mask[None], scale=scale)
        out[a:z] = o.transpose(0, 1)
    return out


def prefill_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens, scale: float,
                             max_new: int = 0) -> torch.Tensor:
    from ..kernels.prefill_attention import prefill_attention_triton as launch

    return launch(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens, scale, max_new)


IMPLEMENTATIONS = {"torch": prefill_attention_torch, "triton": prefill_attention_triton}
_registry.register(OP, {"triton": _registry.triton_status("prefill_attention")})


@_registry.define(OP, fake=lambda q, *args: torch.empty_like(q))
def _prefill_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                          seq_lens: torch.Tensor, cu_seqlens: torch.Tensor, scale: float, max_new: int) -> torch.Tensor:
    return IMPLEMENTATIONS[_registry.backend(OP, q.device.type)](q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens,
                                                                  scale, max_new)


def prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens, scale: float, *, max_new: int | None = None,
                      check: bool = True) -> torch.Tensor:
    """Causal attention of the new tokens q (N, heads, D) of B sequences over their cached keys.

    max_new: the most new tokens of one sequence, when the caller knows it (else read from
    cu_seqlens, a device-to-host copy). check=False skips validation."""
    B = block_tables.shape[0]
    if check:
        check_paged("prefill_attention", q, k_cache, v_cache, block_tables, seq_lens, B)
        if cu_seqlens.shape != (B + 1,) or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"prefill_attention: cu_seqlens must be int ({B + 1},), got {tuple(cu_seqlens.shape)} {cu_seqlens.dtype}")
        if not _registry.tracing(q):
            counts = cu_seqlens[1:] - cu_seqlens[:-1]
            if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != q.shape[0] or bool((counts < 0).any()) \
                    or bool((counts > seq_lens).any()):
                raise ValueError(f"prefill_attention: cu_seqlens must rise from 0 to {q.shape[0]} with each sequence's new "
                                 f"tokens at most its seq_len, got {cu_seqlens.tolist()} for seq_lens {seq_lens.tolist()}")
    if max_new is None:
        max_new = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if B else 0
    return torch.ops.vpt_fast.prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens, scale, max_new)
