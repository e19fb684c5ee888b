"""vpt_fast ops: shape/dtype checks and backend dispatch, one file per op."""

from ._dispatch import BACKENDS, BackendUnavailable
from .crop_patch_embed import crop_patch_embed, crop_patch_rows_reference, resample_tables
from .kv_splice import kv_splice, kv_splice_reference
from .mrope import mrope_positions

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "crop_patch_embed",
    "crop_patch_rows_reference",
    "kv_splice",
    "kv_splice_reference",
    "mrope_positions",
    "resample_tables",
]
