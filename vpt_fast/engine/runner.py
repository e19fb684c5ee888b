"""The Qwen2-VL text decoder's forward, written over the HF module's own parameters.

No weight is copied: the runner reads the transformers module's tensors, so the
engine owns the cache layout, the positions and the attention while the model
stays the user's. Arithmetic follows transformers' Qwen2-VL modules (RMSNorm in
float32, rotate-half M-RoPE, grouped-query attention, SwiGLU MLP), through the ops'
torch definitions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import kv_splice
from ..ops.decode_attention import decode_attention
from ..ops.mrope import apply_rotary
from ..ops.norm import add_rms_norm, add_rms_norm_reference, silu_mul
from .cache import KVCache


class Runner:
    def __init__(self, hf_model):
        text = hf_model.model.language_model
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
        self.rotary = text.rotary_emb
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

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return add_rms_norm_reference(x, None, weight, self.eps)[1]

    @torch.no_grad()
    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache, slots: torch.Tensor,
                new_lens: torch.Tensor) -> torch.Tensor:
        """Run new tokens of several sequences through the decoder, appending their KV.

        embeds (B, T, H): the new tokens' input embeddings, row b valid for its first
        new_lens[b] entries (the rest is padding); positions (3, B, T); slots (B,) the
        cache slot of each row. Each row's tokens are written after the slot's current
        length, attend to everything before them, and the slot's length grows by
        new_lens[b]. Returns the final hidden states (B, T, H) after the last RMSNorm.
        """
        B, T, _ = embeds.shape
        lengths = cache.lengths[slots]  # (B,) before this call
        total = lengths + new_lens
        if bool((total > cache.max_len).any()):
            raise ValueError(f"cache overflow: lengths {total.tolist()} exceed the slot size {cache.max_len}")
        offs = torch.arange(T, device=embeds.device)
        valid = offs[None, :] < new_lens[:, None]  # (B, T)
        slot_mapping = torch.where(valid, slots[:, None] * cache.max_len + lengths[:, None] + offs[None, :], -1).flatten()
        S = int(total.max())
        keys = torch.arange(S, device=embeds.device)
        # key j is visible to query i of row b when it exists and is not in the future
        live = keys[None, :] < total[:, None]  # (B, S): below the row's length after this call
        mask = live[:, None, :] & (keys[None, None, :] <= (lengths[:, None] + offs[None, :])[:, :, None])
        # positions past a row's length hold stale entries (rolled back, another sequence's, never
        # written); a masked NaN/inf still poisons the attention, so they are zeroed, not just masked
        live_kv = live[:, :, None, None]
        cos, sin = self.rotary(embeds, positions)  # (B, T, D)
        cos_h, sin_h = cos[:, :, None, :], sin[:, :, None, :]
        flat_cos, flat_sin = cos.reshape(B * T, -1), sin.reshape(B * T, -1)
        groups = self.num_heads // self.num_kv_heads

        x = embeds
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = self._norm(x, layer.input_layernorm.weight)
            q = F.linear(h, attn.q_proj.weight, attn.q_proj.bias).view(B, T, self.num_heads, self.head_dim)
            k = F.linear(h, attn.k_proj.weight, attn.k_proj.bias).view(B * T, self.num_kv_heads, self.head_dim)
            v = F.linear(h, attn.v_proj.weight, attn.v_proj.bias).view(B * T, self.num_kv_heads, self.head_dim)
            q = apply_rotary(q, cos_h, sin_h)
            k_cache, v_cache = cache.layer(i)
            kv_splice(k, v, k_cache, v_cache, slot_mapping, flat_cos, flat_sin)
            K = torch.where(live_kv, k_cache[slots, :S], 0).transpose(1, 2)  # (B, kvh, S, D)
            V = torch.where(live_kv, v_cache[slots, :S], 0).transpose(1, 2)
            if groups > 1:
                K = K.repeat_interleave(groups, dim=1)
                V = V.repeat_interleave(groups, dim=1)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), K, V, attn_mask=mask[:, None], scale=self.head_dim**-0.5)
            o = o.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
            x = x + F.linear(o, attn.o_proj.weight)
            h = self._norm(x, layer.post_attention_layernorm.weight)
            mlp = layer.mlp
            x = x + mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h))
        cache.lengths[slots] = total
        return self._norm(x, self.text.norm.weight)

    @torch.no_grad()
    def decode(self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache, slots: torch.Tensor) -> torch.Tensor:
        """One new token per row, with no host synchronisation and fixed shapes (CUDA-graph safe).

        embeds (B, H); positions (3, B); slots (B,). Each row's token is written at its
        slot's length (read on the device) and attends to everything up to it; lengths
        grow by one. Returns the final hidden states (B, H).
        """
        B = embeds.shape[0]
        lengths = cache.lengths[slots]
        slot_mapping = slots * cache.max_len + lengths
        seq_lens = lengths + 1
        x = embeds.contiguous()
        cos, sin = self.rotary(x[:, None, :], positions[:, :, None])  # (B, 1, D)
        cos, sin = cos[:, 0], sin[:, 0]
        residual = None
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x, h = add_rms_norm(x, residual, layer.input_layernorm.weight, self.eps)
            q = F.linear(h, attn.q_proj.weight, attn.q_proj.bias).view(B, self.num_heads, self.head_dim)
            k = F.linear(h, attn.k_proj.weight, attn.k_proj.bias).view(B, self.num_kv_heads, self.head_dim)
            v = F.linear(h, attn.v_proj.weight, attn.v_proj.bias).view(B, self.num_kv_heads, self.head_dim)
            k_cache, v_cache = cache.layer(i)
            kv_splice(k, v, k_cache, v_cache, slot_mapping, cos, sin, check=False)
            o = decode_attention(q, k_cache, v_cache, slots, seq_lens, self.head_dim**-0.5, cos, sin, check=False)
            x, h = add_rms_norm(x, F.linear(o.reshape(B, self.num_heads * self.head_dim), attn.o_proj.weight),
                                layer.post_attention_layernorm.weight, self.eps)
            mlp = layer.mlp
            residual = mlp.down_proj(silu_mul(mlp.gate_proj(h), mlp.up_proj(h)))
        x, h = add_rms_norm(x, residual, self.text.norm.weight, self.eps)
        cache.lengths[slots] = seq_lens
        return h

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
