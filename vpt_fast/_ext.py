"""The compiled kernels of csrc/, as an optional extension: `torch.ops.vpt_fast_ext.*`.

These are the "ext" backend of the public ops (`torch.ops.vpt_fast.kv_splice`,
`crop_patch_rows`): the public op calls them when that backend is chosen. They keep a
namespace of their own, with Meta kernels, so that the public op stays one definition that
torch.compile traces (seeing the Triton kernels of the "triton" backend) while an ext kernel
stays one opaque call, the same compiled or not.

`load()` returns the ops namespace or None, and never raises: vpt_fast works without the
extension (the ops use their torch or Triton backends and say so). It uses, in order of
preference:

1. `vpt_fast._C`, built by setup.py when torch with CUDA and a CUDA toolkit were present
   at install time (CPU and CUDA kernels);
2. a build on first use with `torch.utils.cpp_extension` (needs ninja and a C++ compiler;
   adds the CUDA kernels when a GPU, CUDA torch and a CUDA toolkit are present), kept in
   `$VPT_FAST_BUILD_DIR` or the cache folder's `ext/` (see `vpt_fast._cache`), one folder
   per build whose name carries a hash of the sources, the flags, torch and the
   interpreter, so checkouts and virtual environments never rebuild each other's. A build
   runs in a private folder renamed into place when done: a process killed mid-build
   leaves nothing that makes later ones wait. The first build says so on stderr.

The outcome is kept for the process; why it failed is logged once (logger "vpt_fast.ops").
`VPT_FAST_NO_EXT=1` turns the extension off. `available(device_type)` says whether the
extension has kernels for "cpu" or "cuda" tensors, or why not.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path

import torch

from ._cache import build_once, cache_dir

NAMESPACE = "vpt_fast_ext"
OPS = ("kv_splice", "crop_patch_rows")
SOURCES = ("vpt_ops.cpp", "vpt_ops_cuda.cu", "vpt_ops.h")
CXX_FLAGS = ["-O3", "-ffp-contract=off"]  # no fused multiply-add: float32 kv_splice matches torch bit for bit
CUDA_FLAGS = ["-O3"]

logger = logging.getLogger("vpt_fast.ops")
_lock = threading.Lock()
# "ops": the namespace or None; "reason": why it is None; "no_cuda": why a build from source left
# out the CUDA kernels.
_result: dict[str, object] = {}


def disabled() -> bool:
    return os.environ.get("VPT_FAST_NO_EXT", "") not in ("", "0")


def source_dir() -> Path | None:
    """csrc/ shipped inside the installed package, else the source checkout's top-level csrc/."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if all((candidate / name).is_file() for name in SOURCES):
            return candidate
    return None


def build_dir(with_cuda: bool) -> Path:
    """The finished build's folder for this source tree, flags, torch and interpreter."""
    root = Path(os.environ.get("VPT_FAST_BUILD_DIR") or cache_dir() / "ext")
    variant = f"cuda{torch.version.cuda}" if with_cuda else "cpu"
    digest = hashlib.sha256()
    csrc = source_dir()
    for name in SOURCES:
        digest.update(name.encode() + b"\0" + ((csrc / name).read_bytes() if csrc else b"") + b"\0")
    for part in (CXX_FLAGS, CUDA_FLAGS, variant, torch.__version__, sys.executable, sys.version):
        digest.update(repr(part).encode() + b"\0")
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-{variant}-{digest.hexdigest()[:12]}"
    return root / re.sub(r"[^A-Za-z0-9._-]", "_", tag)


def _cuda_build_reason() -> str | None:
    """None when the CUDA kernels can be built here, else why not."""
    if torch.version.cuda is None:
        return "torch has no CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME)"
    if not (Path(CUDA_HOME) / "include" / "cuda_runtime.h").is_file():
        return f"CUDA_HOME={CUDA_HOME} holds no include/cuda_runtime.h (set CUDA_HOME to the toolkit's root)"
    return None


def _import_prebuilt() -> bool:
    try:
        importlib.import_module("vpt_fast._C")
    except ModuleNotFoundError as err:
        if err.name != "vpt_fast._C":
            logger.warning("vpt_fast._C cannot be imported (%s); building the extension from source", err)
        return False
    except (ImportError, OSError) as err:  # e.g. built against another torch
        logger.warning("vpt_fast._C cannot be imported (%s); building the extension from source", err)
        return False
    return True


def _build(verbose: bool) -> tuple[str, str | None]:
    """Load the extension built from csrc/, building it first when this tree has no build yet;
    returns a description of what was loaded and why the CUDA kernels were left out (None when
    they are in)."""
    from torch.utils import cpp_extension

    csrc = source_dir()
    if csrc is None:
        raise RuntimeError(f"the C++/CUDA sources ({', '.join(SOURCES)}) are not installed with vpt_fast")
    no_cuda = _cuda_build_reason()
    with_cuda = no_cuda is None
    sources = [str(csrc / "vpt_ops.cpp")] + ([str(csrc / "vpt_ops_cuda.cu")] if with_cuda else [])
    directory = build_dir(with_cuda)
    kernels = "CPU and CUDA kernels" if with_cuda else f"CPU kernels only: {no_cuda}"
    start = time.perf_counter()

    def compile_into(folder: Path) -> None:
        cpp_extension.verify_ninja_availability()
        print(f"vpt_fast: compiling its C++{'/CUDA' if with_cuda else ''} kernels once, about a minute "
              f"(kept in {directory})", file=sys.stderr, flush=True)
        cpp_extension.load(name=NAMESPACE, sources=sources, extra_cflags=CXX_FLAGS, extra_cuda_cflags=CUDA_FLAGS,
                           with_cuda=with_cuda, build_directory=str(folder), verbose=verbose)

    if build_once(directory, compile_into):
        return f"built in {directory} ({kernels}; {time.perf_counter() - start:.1f} s)", no_cuda
    torch.ops.load_library(str(directory / f"{NAMESPACE}.so"))
    return f"loaded from {directory} ({kernels})", no_cuda


def _short(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    first = text.splitlines()[0]
    return first if len(first) <= 200 else first[:197] + "..."


def load(verbose: bool = False):
    """The `torch.ops.vpt_fast_ext` namespace, or None when the extension is off or cannot be
    built (the reason is logged once and given by `available`). Built at most once per process;
    `verbose` shows the compiler's output."""
    if disabled():
        return None
    with _lock:
        if not _result:
            _result.update(_load(verbose))
        return _result["ops"]


def _load(verbose: bool) -> dict[str, object]:
    try:
        how, no_cuda = ("vpt_fast._C", None) if _import_prebuilt() else _build(verbose)
        ops = getattr(torch.ops, NAMESPACE)
        for name in OPS:
            getattr(ops, name)
        _register_fakes()
    except Exception as err:  # any failure means "no extension", never a failed import of vpt_fast
        logger.warning("vpt_fast C++/CUDA extension unavailable, using the other backends: %s", err)
        return {"ops": None, "reason": _short(err), "no_cuda": None}
    logger.info("vpt_fast extension: %s", how)
    return {"ops": ops, "reason": None, "no_cuda": no_cuda}


def _register_fakes() -> None:
    """Shape-only kernels of the extension's ops, for fake tensors (torch.compile) and the meta
    device; written here rather than in C++ so that symbolic shapes work."""

    @torch.library.register_fake(f"{NAMESPACE}::kv_splice")
    def _(k_new, v_new, k_cache, v_cache, slot_mapping, cos, sin):
        if slot_mapping.dtype != torch.int64:
            raise RuntimeError(f"kv_splice: slot_mapping must be int64, got {slot_mapping.dtype}")
        return None

    @torch.library.register_fake(f"{NAMESPACE}::crop_patch_rows")
    def _(image, iy, wy, ix, wx, mean, std, patch_size, merge_size, vertical_first=False):
        rows = (iy.shape[0] // patch_size) * (ix.shape[0] // patch_size)
        return image.new_empty((rows, 3 * patch_size * patch_size), dtype=torch.float32)


def available(device_type: str) -> bool | str:
    """True when the extension has kernels for tensors of `device_type` ("cpu", "cuda"),
    otherwise a short reason."""
    if disabled():
        return "disabled by VPT_FAST_NO_EXT"
    ops = load()
    if ops is None:
        return f"extension not built: {_result['reason']}"
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return f"no kernels for {device_type} tensors"
    if all(torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", key) for op in OPS):
        return True
    if key == "CUDA":
        return f"built without CUDA ({_result['no_cuda']})" if _result["no_cuda"] else "built without CUDA"
    return f"built without {device_type} kernels"
