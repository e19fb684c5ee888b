"""The Qwen2-VL text decoder's forward, written over the HF module's own parameters.

No weight is copied: the runner reads the transformers module's tensors, so the
engine owns the cache layout, the positions and the attention while the model
stays the user's. Arithmetic follows transformers' Qwen2-VL modules (RMSNorm in
float32, rotate-half M-RoPE, grouped-query attention, SwiGLU MLP), through the ops.
Prefill (a packed ragged batch of new tokens) and decode (one token per sequence, graph
capturable) share one decoder-layer body and differ only in their attention op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _hf_compat
from ..ops import kv_splice
from ..ops.decode_attention import decode_attention
from ..ops.mrope import apply_rotary
from ..ops.norm import add_rms_norm, silu_mul
from ..ops.prefill_attention import prefill_attention
from .cache import PagedKVCache


class Runner:
    def __init__(self, hf_model):
        text = _hf_compat.text_model(hf_model)
        self.model = hf_model
        self.text = text
        cfg = text.config
        self.config = cfg
        self.layers = text.layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.hidden_size = cfg.hidden_size
        self.eps = cfg.rms_norm_eps
        self.rotary = _hf_compat.rotary_embedding(text)
        self.lm_head = hf_model.lm_head
        if cfg.hidden_act != "silu":
            raise NotImplementedError(f"the runner implements Qwen2-VL's SiLU MLP, the model says {cfg.hidden_act!r}")
        if getattr(cfg, "use_sliding_window", False) and cfg.sliding_window is not None:
            if any(t == "sliding_attention" for t in cfg.layer_types):
                raise NotImplementedError("sliding-window attention layers are not supported (no released VPT model uses them)")

    @property
    def device(self) -> torch.device:
        return self.text.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text.embed_tokens.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text.embed_tokens(ids)

    def _rotary(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (N, head_dim) of N tokens at M-RoPE positions (3, N)."""
        cos, sin = self.rotary(x[None], positions[:, None, :])
        return cos[0], sin[0]

    def _layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: PagedKVCache,
                slot_mapping: torch.Tensor, attend) -> torch.Tensor:
        """The decoder over N tokens (N, H): every layer writes the tokens' keys and values at
        their slots and calls `attend(layer, q, cos, sin)` for the attention output
        (N, heads, head_dim). Returns the final hidden states after the last RMSNorm."""
        N = x.shape[0]
        residual = None
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x, h = add_rms_norm(x, residual, layer.input_layernorm.weight, self.eps, check=False)
            q = F.linear(h, attn.q_proj.weight, attn.q_proj.bias).view(N, self.num_heads, self.head_dim)
            k = F.linear(h, attn.k_proj.weight, attn.k_proj.bias).view(N, self.num_kv_heads, self.head_dim)
            v = F.linear(h, attn.v_proj.weight, attn.v_proj.bias).view(N, self.num_kv_heads, self.head_dim)
            k_cache, v_cache = cache.layer(i)
            kv_splice(k, v, k_cache, v_cache, slot_mapping, cos, sin, check=False)
            o = attend(k_cache, v_cache, q, cos, sin)
            x, h = add_rms_norm(x, F.linear(o.reshape(N, self.num_heads * self.head_dim), attn.o_proj.weight),
                                layer.post_attention_layernorm.weight, self.eps, check=False)
            mlp = layer.mlp
            residual = mlp.down_proj(silu_mul(mlp.gate_proj(h), mlp.up_proj(h), check=False))
        return add_rms_norm(x, residual, self.text.norm.weight, self.eps, check=False)[1]

    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor, positions: torch.Tensor, cache: PagedKVCache, slot_mapping: torch.Tensor,
                block_tables: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens: torch.Tensor, max_new: int) -> torch.Tensor:
        """Append the new tokens of several sequences, packed: embeds (N, H), positions (3, N),
        slot_mapping (N,) where each token's key and value go. Sequence b's tokens are
        embeds[cu_seqlens[b]:cu_seqlens[b + 1]], the last ones of its seq_lens[b] tokens; they
        attend causally to everything before them through block_tables (B, M). max_new: the
        most new tokens of one sequence. Returns the final hidden states (N, H)."""
        cos, sin = self._rotary(embeds, positions)
        scale = self.head_dim**-0.5

        def attend(k_cache, v_cache, q, cos, sin):
            q = apply_rotary(q, cos[:, None, :], sin[:, None, :])
            return prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens, scale, max_new=max_new,
                                     check=False)

        return self._layers(embeds.contiguous(), cos, sin, cache, slot_mapping, attend)

    @torch.no_grad()
    def decode(self, embeds: torch.Tensor, positions: torch.Tensor, cache: PagedKVCache, slot_mapping: torch.Tensor,
               block_tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """One new token per sequence, with no host synchronisation and fixed shapes (CUDA-graph
        safe): embeds (B, H), positions (3, B), slot_mapping (B,) (-1: a padding row, not
        written), block_tables (B, M), seq_lens (B,) including the new token. Returns the final
        hidden states (B, H)."""
        cos, sin = self._rotary(embeds, positions)
        scale = self.head_dim**-0.5

        def attend(k_cache, v_cache, q, cos, sin):
            return decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, cos, sin, check=False)

        return self._layers(embeds.contiguous(), cos, sin, cache, slot_mapping, attend)

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
