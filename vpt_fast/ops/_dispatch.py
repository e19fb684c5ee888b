"""Backend choice for the ops: explicit, logged once, never a silent change of results.

A backend asked for by name (the `backend=` argument or the VPT_FAST_BACKEND
environment variable) must run, or the call raises. Without a request the best
available backend for the tensors' device is used, and the choice is logged once.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

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


def interpreting_triton() -> bool:
    """Whether Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    return None


def triton_status(device_type: str, kernel_module: str) -> bool | str:
    """True when the Triton kernels of `vpt_fast.kernels.<kernel_module>` can run on tensors
    of `device_type`, else why not.

    On CPU tensors they run only in Triton's interpreter, and only if the kernels were
    defined under it: `triton.jit` decides between compiled and interpreted code when the
    kernel module is imported, so TRITON_INTERPRET=1 must be set before that.
    """
    missing = _triton_import_error()
    if missing is not None:
        return missing
    if device_type == "cuda":
        return True
    if device_type != "cpu":
        return f"triton does not run on {device_type} tensors"
    if not interpreting_triton():
        return "triton runs on CPU tensors only in its interpreter (TRITON_INTERPRET=1)"
    from ..kernels import interpreted

    name = f"vpt_fast.kernels.{kernel_module}"
    if not interpreted(importlib.import_module(name)):
        return f"TRITON_INTERPRET=1 was not set yet when {name} was imported"
    return True


def triton_or_torch(device_type: str, kernel_module: str) -> dict[str, bool | str]:
    """The backends of an op with a Triton kernel and no compiled one, in order of preference:
    Triton first on CUDA tensors; on the CPU torch first, so Triton's interpreter runs only
    when asked for by name."""
    status = triton_status(device_type, kernel_module)
    return {"triton": status, "torch": True} if device_type == "cuda" else {"torch": True, "triton": status}


@functools.cache
def extension_status(op: str, device_type: str) -> bool | str:
    """True when the compiled extension (vpt_fast._ext) has `op` for `device_type`
    tensors, else why not. The extension is optional: it is imported here, on first use."""
    try:
        from .. import _ext
    except ImportError as exc:
        return f"the vpt_fast extension is not built ({exc})"
    status = _ext.available(device_type)
    if status is not True:
        return status if isinstance(status, str) and status else f"the vpt_fast extension has no {device_type} kernels"
    try:
        getattr(torch.ops.vpt_fast_ext, op)
    except (AttributeError, RuntimeError):
        return f"the vpt_fast extension does not register vpt_fast_ext::{op}"
    return True


def device_backends(op: str, kernel_module: str, device_type: str) -> dict[str, bool | str]:
    """Every backend of an op (extension kernel `vpt_fast_ext::<op>`, Triton kernel in
    `vpt_fast.kernels.<kernel_module>`) in order of preference for tensors on `device_type`,
    mapped to True or the reason it cannot run. Triton never comes before torch on the CPU:
    its interpreter is for testing, not a backend to pick."""
    if device_type == "cuda":
        return {
            "cuda": extension_status(op, "cuda"),
            "triton": triton_status("cuda", kernel_module),
            "torch": True,
            "cpp": "the cpp backend runs on CPU tensors, these are on cuda",
        }
    return {
        "cpp": extension_status(op, "cpu") if device_type == "cpu" else f"the cpp backend runs on CPU tensors, not {device_type}",
        "torch": True,
        "triton": triton_status(device_type, kernel_module),
        "cuda": f"the tensors are on {device_type}, not cuda",
    }
