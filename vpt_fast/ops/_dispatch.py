"""Backend choice for the ops: explicit, logged once, never a silent change of results.

A backend asked for by name (the `backend=` argument or the VPT_FAST_BACKEND
environment variable) must run, or the call raises. Without a request the best
available backend for the tensors' device is used, and the choice is logged once.
"""

from __future__ import annotations

import logging
import os

BACKENDS = ("torch", "triton", "cpp", "cuda")
logger = logging.getLogger("vpt_fast.ops")
_announced: set[tuple[str, str]] = set()


class BackendUnavailable(RuntimeError):
    """A backend was requested by name and cannot run here."""


def requested_backend(backend: str | None) -> str | None:
    choice = backend if backend is not None else os.environ.get("VPT_FAST_BACKEND") or None
    if choice is not None and choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r}")
    return choice


def choose(op: str, backend: str | None, available: dict[str, bool | str]) -> str:
    """Pick a backend for `op`. `available` maps backend -> True or the reason it cannot run,
    in order of preference."""
    want = requested_backend(backend)
    if want is not None:
        status = available.get(want, f"{op} has no {want} backend")
        if status is not True:
            raise BackendUnavailable(f"{op}: backend {want!r} was requested but cannot run: {status}")
        chosen = want
    else:
        chosen = next(name for name, ok in available.items() if ok is True)
        skipped = [f"{name} ({why})" for name, why in available.items() if why is not True]
        if (op, chosen) not in _announced and skipped:
            logger.info("%s: using the %s backend; not available: %s", op, chosen, ", ".join(skipped))
    if (op, chosen) not in _announced:
        _announced.add((op, chosen))
        logger.info("%s: backend %s", op, chosen)
    return chosen
