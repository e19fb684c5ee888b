"""vpt_fast ops: torch ops a serving framework can call by name, each defined once.

    torch.ops.vpt_fast.kv_splice(k_new, v_new, k_cache, v_cache, slot_mapping, cos, sin)
    torch.ops.vpt_fast.decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, cos, sin)
    torch.ops.vpt_fast.prefill_attention(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens, scale, max_new)
    torch.ops.vpt_fast.crop_patch_rows(image, iy, wy, ix, wx, mean, std, patch_size, merge_size, vertical_first)
    torch.ops.vpt_fast.crop_patch_embed(image, box, out_hw, mean, std, max_side, patch_size, merge_size,
                                        temporal_patch_size, weight)
    torch.ops.vpt_fast.add_rms_norm(x, residual, weight, eps), rms_norm(x, weight, eps), silu_mul(gate, up)

The functions here check their arguments and call those ops. Each op runs one backend per
device type, chosen once (`set_backend`, VPT_FAST_BACKEND, or automatically at first use;
see `_registry`); each module's `IMPLEMENTATIONS` holds its backends' functions, the torch
one being the op's definition. The Triton kernels are launched through
`torch.library.wrap_triton`, so torch.compile sees them inside the ops.
"""

from ._registry import BACKENDS, BackendUnavailable, chosen, set_backend
from .crop_patch_embed import crop_patch_embed, crop_patch_rows, crop_patch_rows_torch, resample_tables
from .decode_attention import decode_attention, decode_attention_torch
from .kv_splice import kv_splice, kv_splice_torch
from .mrope import mrope_positions
from .norm import add_rms_norm, add_rms_norm_torch, silu_mul, silu_mul_torch
from .prefill_attention import prefill_attention, prefill_attention_torch

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "add_rms_norm",
    "add_rms_norm_torch",
    "chosen",
    "crop_patch_embed",
    "crop_patch_rows",
    "crop_patch_rows_torch",
    "decode_attention",
    "decode_attention_torch",
    "kv_splice",
    "kv_splice_torch",
    "mrope_positions",
    "prefill_attention",
    "prefill_attention_torch",
    "resample_tables",
    "set_backend",
    "silu_mul",
    "silu_mul_torch",
]
