"""Backend choice for the ops: made once per op and device type, never per call.

Backends: "torch" (the op's definition), "triton" (`vpt_fast.kernels`), "ext" (the compiled
extension of csrc/, `vpt_fast._ext`) and "flash_attn" (decode_attention only, where the
flash-attn package is installed). The choice for an op is made at its first use on a device
type, following a request made before by `set_backend` (an engine's `backend=` argument) or
the VPT_FAST_BACKEND variable: a name ("triton") for every op that has such a backend, or
per op ("kv_splice=ext,decode_attention=triton"). A backend asked for must be able to run
or the op's first use raises BackendUnavailable. Without a request, the first available
backend of the device's order is taken (ext, triton, torch on CUDA; ext, torch on the CPU,
where Triton runs only in its interpreter, a testing tool) and the choice is logged once.
After that an op finds its backend with one dict lookup: no logging, no host
synchronisation, nothing torch.compile has to trace.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import os
from typing import Callable

import torch

BACKENDS = ("torch", "triton", "ext", "flash_attn")
AUTOMATIC = {"cuda": ("ext", "triton", "torch"), "cpu": ("ext", "torch")}
logger = logging.getLogger("vpt_fast.ops")

Status = Callable[[str], "bool | str"]  # device type -> True, or why the backend cannot run there
_OPS: dict[str, dict[str, Status]] = {}
_chosen: dict[tuple[str, str], str] = {}
_request: dict[str, str] | None = None  # op (or "*" for every op) -> backend; None: read VPT_FAST_BACKEND


class BackendUnavailable(RuntimeError):
    """A backend was asked for and cannot run here."""


def register(op: str, statuses: dict[str, Status]) -> None:
    """Declare an op's backends (besides "torch", which every op has) and how to tell whether
    each can run on a device type."""
    unknown = set(statuses) - set(BACKENDS)
    if unknown:
        raise ValueError(f"{op}: unknown backends {sorted(unknown)}")
    _OPS[op] = {"torch": lambda device_type: True, **statuses}


def ops() -> dict[str, tuple[str, ...]]:
    """Every registered op and its backends."""
    return {op: tuple(statuses) for op, statuses in _OPS.items()}


def _parse(spec: str | dict[str, str] | None) -> dict[str, str]:
    if spec is None or spec == "":
        return {}
    if isinstance(spec, str):
        pairs = {}
        for part in spec.split(","):
            op, sep, name = part.strip().rpartition("=")
            pairs[op.strip() if sep else "*"] = name.strip()
        spec = pairs
    if not isinstance(spec, dict):
        raise TypeError(f"a backend request is a name, 'op=name,...' or a dict, got {type(spec).__name__}")
    for op, name in spec.items():
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}" + (f" for {op}" if op != "*" else ""))
        if op != "*" and op not in _OPS:
            raise ValueError(f"no op named {op!r}: the ops are {sorted(_OPS)}")
        if op != "*" and name not in _OPS[op]:
            raise ValueError(f"{op} has no {name!r} backend (it has {', '.join(_OPS[op])})")
    return dict(spec)


def _requested(op: str) -> str | None:
    request = _request if _request is not None else _parse(os.environ.get("VPT_FAST_BACKEND"))
    if op in request:
        return request[op]
    name = request.get("*")
    return name if name in _OPS[op] else None


def set_backend(spec: str | dict[str, str] | None) -> None:
    """Ask for backends before the ops are first used (this replaces VPT_FAST_BACKEND): a name
    for every op that has it, "op=name,..." or {op: name}; None or "" asks for nothing. A
    choice already made cannot change: asking for another backend for it raises RuntimeError."""
    global _request
    request = _parse(spec)
    for (op, device_type), have in _chosen.items():
        want = request.get(op) or (request.get("*") if request.get("*") in _OPS[op] else None)
        if want is not None and want != have:
            raise RuntimeError(f"{op} already runs on the {have} backend for {device_type} tensors in this process; "
                               f"a backend is chosen once: ask for {want!r} before the first use (or in VPT_FAST_BACKEND)")
    _request = request


def backend(op: str, device_type: str) -> str:
    """The backend of `op` for tensors on `device_type`, chosen at the first call."""
    chosen = _chosen.get((op, device_type))
    if chosen is None:
        chosen = _chosen[(op, device_type)] = _choose(op, device_type)
    return chosen


def chosen() -> dict[tuple[str, str], str]:
    """The choices made so far: (op, device type) -> backend."""
    return dict(_chosen)


def _choose(op: str, device_type: str) -> str:
    statuses = _OPS[op]
    want = _requested(op)
    if want is not None:
        status = statuses[want](device_type)
        if status is not True:
            raise BackendUnavailable(f"{op}: backend {want!r} was asked for but cannot run on {device_type} tensors: {status}")
        logger.info("%s on %s: backend %s (asked for)", op, device_type, want)
        return want
    skipped = []
    for name in AUTOMATIC.get(device_type, ()):
        if name in statuses:
            status = statuses[name](device_type)
            if status is True:
                logger.info("%s on %s: backend %s%s", op, device_type, name,
                            f"; not available: {', '.join(skipped)}" if skipped else "")
                return name
            skipped.append(f"{name} ({status})")
    logger.info("%s on %s: backend torch", op, device_type)
    return "torch"


def tracing(t: torch.Tensor) -> bool:
    """Whether reading a value of `t` on the host is off limits: under torch.compile, or while a
    CUDA graph is being captured (argument checks skip their data-dependent parts then)."""
    return torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing())


# ----------------------------------------------------------------------------- availability


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


def triton_status(kernel_module: str) -> Status:
    """Whether the Triton kernels of `vpt_fast.kernels.<kernel_module>` can run on a device type.

    On CPU tensors they run only in Triton's interpreter, and only if the kernels were defined
    under it: `triton.jit` decides between compiled and interpreted code when the kernel module
    is imported, so TRITON_INTERPRET=1 must be set before that."""

    def status(device_type: str) -> bool | str:
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

    return status


def extension_status(ext_op: str) -> Status:
    """Whether the compiled extension has `vpt_fast_ext::<ext_op>` for a device type; the
    extension is loaded (built on first use) when this is first asked."""

    @functools.cache
    def status(device_type: str) -> bool | str:
        from .. import _ext

        available = _ext.available(device_type)
        if available is not True:
            return available
        try:
            getattr(torch.ops.vpt_fast_ext, ext_op)
        except (AttributeError, RuntimeError):
            return f"the vpt_fast extension does not register vpt_fast_ext::{ext_op}"
        return True

    return status


def flash_attn_status(device_type: str) -> bool | str:
    if device_type != "cuda":
        return f"flash-attn runs on CUDA tensors, not {device_type}"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "flash-attn is not installed (pip install 'vpt_fast[flash]')"
    return True


def define(name: str, *, mutates_args: tuple[str, ...] = (), fake: Callable):
    """Decorator: define the op `vpt_fast::<name>` from its body (which runs the chosen backend).

    It is a `torch.library.triton_op`, so when the chosen backend is triton, torch.compile
    traces the body and sees the Triton kernel (`launcher`). With another backend the op stays
    one node in a compiled graph: the body may read values on the host (a torch definition)
    or call the extension. `fake` gives the outputs' shapes for fake tensors."""

    def wrap(fn: Callable):
        from torch._subclasses.functional_tensor import FunctionalTensorMode

        body = _on_tensor_device(fn)
        if _triton_import_error() is not None:  # no Triton kernel to trace: a plain custom op
            op = torch.library.custom_op(f"vpt_fast::{name}", body, mutates_args=mutates_args)
            op.register_fake(fake)
            return op
        op = torch.library.triton_op(f"vpt_fast::{name}", body, mutates_args=mutates_args)
        op.register_fake(fake)

        def functional(mode, func, types, args, kwargs):
            device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
            if backend(name, device) == "triton" and not _export_keeps_triton_ops():
                with mode:
                    return body(*args, **kwargs)
            return mode.__torch_dispatch__(func, types, args, kwargs)

        op.register_torch_dispatch(FunctionalTensorMode, functional)
        return op

    return wrap


def device_guard(device: torch.device | str):
    """A context in which `device` is the current CUDA device (`torch.cuda.device`); nothing for
    other devices. Triton launches, CUDA streams and graph capture act on the current device,
    which is per thread and is cuda:0 unless set: every call on a model placed on cuda:N runs
    under this."""
    device = torch.device(device)
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _on_tensor_device(fn: Callable) -> Callable:
    """`fn` run under `device_guard` of its first tensor argument's device (signature kept, for
    the op schema)."""

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        if (device.type != "cuda" or torch.compiler.is_compiling() or device.index is None
                or device.index == torch.cuda.current_device()):  # already there: nothing to set
            return fn(*args, **kwargs)
        with device_guard(device):
            return fn(*args, **kwargs)

    guarded.__signature__ = inspect.signature(fn, eval_str=True)  # annotations resolved in fn's module
    return guarded


def _export_keeps_triton_ops() -> bool:
    """torch.export keeps Triton ops whole (see torch.library.triton_op)."""
    try:
        from torch.export._trace import custom_triton_ops_decomposition_disabled
    except ImportError:
        return False
    return custom_triton_ops_decomposition_disabled()


def launcher(kernel):
    """`kernel` as the ops launch it: `torch.library.wrap_triton(kernel)`, so that torch.compile
    sees the Triton kernel inside the op. In eager calls that is the kernel itself."""
    try:
        return torch.library.wrap_triton(kernel)
    except RuntimeError:  # an interpreted kernel (TRITON_INTERPRET=1) on a torch that does not take it
        return kernel
