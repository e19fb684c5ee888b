"""vpt_fast ops: shape/dtype checks and backend dispatch, one file per op."""

from ._dispatch import BACKENDS, BackendUnavailable
from .crop_patch_embed import crop_patch_embed, crop_patch_rows_reference, resample_tables
from .decode_attention import decode_attention, decode_attention_reference
from .kv_splice import kv_splice, kv_splice_reference
from .mrope import mrope_positions
from .norm import add_rms_norm, add_rms_norm_reference, silu_mul, silu_mul_reference
from .prefill_attention import prefill_attention, prefill_attention_reference

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "add_rms_norm",
    "add_rms_norm_reference",
    "crop_patch_embed",
    "crop_patch_rows_reference",
    "decode_attention",
    "decode_attention_reference",
    "kv_splice",
    "kv_splice_reference",
    "mrope_positions",
    "prefill_attention",
    "prefill_attention_reference",
    "resample_tables",
    "silu_mul",
    "silu_mul_reference",
]
