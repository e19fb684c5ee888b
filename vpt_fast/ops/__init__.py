"""vpt_fast ops: shape/dtype checks and backend dispatch, one file per op."""

from ._dispatch import BACKENDS, BackendUnavailable
from .kv_splice import kv_splice, kv_splice_reference
from .mrope import mrope_positions

__all__ = ["BACKENDS", "BackendUnavailable", "kv_splice", "kv_splice_reference", "mrope_positions"]
