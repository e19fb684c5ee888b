"""The Triton kernels (and, where built, the extension's) against the torch references.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here before
the kernels are imported and only for this module's tests), on tiny shapes: the interpreter is
slow. With CUDA the same tests run compiled on the GPU; the `gpu`-marked tests add the large
and bf16 cases (`pytest -m gpu`). bf16 is checked on the GPU only: the interpreter converts
float32 to bfloat16 by truncation, where the GPU and torch round to nearest even.
"""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch

from ext_cases import assert_same_values

from vpt_fast.kernels import interpreted

CUDA = torch.cuda.is_available()
_SET_HERE = not CUDA and "TRITON_INTERPRET" not in os.environ
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
try:
    pytest.importorskip("triton")
    # triton.jit reads TRITON_INTERPRET when these modules are imported
    crop_kernels = importlib.import_module("vpt_fast.kernels.crop_patch_embed")
    splice_kernels = importlib.import_module("vpt_fast.kernels.kv_splice")
finally:
    if _SET_HERE:  # other modules' tests run without the interpreter
        del os.environ["TRITON_INTERPRET"]
if not CUDA and not all(map(interpreted, (crop_kernels, splice_kernels))):
    pytest.skip("no CUDA, and the kernels were imported before TRITON_INTERPRET=1 was set",
                allow_module_level=True)

from vpt_fast.ops import (  # noqa: E402
    crop_patch_embed,
    crop_patch_rows_reference,
    kv_splice,
    kv_splice_reference,
    resample_tables,
)
from vpt_fast.ops._dispatch import extension_status  # noqa: E402
from vpt_fast.preprocess import CLIP_MEAN, CLIP_STD  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
BLOCK = 16  # paged layout block size


@pytest.fixture(autouse=True, scope="module")
def _interpreter_for_this_module():
    if not _SET_HERE:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


def _extension_or_skip(op: str, device_type: str) -> None:
    status = extension_status(op, device_type)
    if status is not True:
        pytest.skip(status)


# ----------------------------------------------------------------------------- crop_patch_rows


def _rows_args(height, width, box, out_hw, device, seed=0, max_side=512):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=gen).to(device)
    tables = resample_tables(height, width, box, out_hw, max_side, device=device)
    mean = torch.tensor(CLIP_MEAN, device=device)
    std = torch.tensor(CLIP_STD, device=device)
    return (image, *tables, mean, std)


def _assert_rows_close(actual, expected, what):
    from ext_cases import assert_rows_close

    assert_rows_close(actual, expected, what)


ROWS_CASES = {
    # name: (image height, width, box, out_hw)
    "crop to 28x56": (50, 70, (3, 4, 66, 47), (28, 56)),
    "crop to 56x28": (50, 70, (3, 4, 66, 47), (56, 28)),
    "whole image, no resize": (28, 56, (0, 0, 56, 28), (28, 56)),
    "downscale": (60, 150, (0, 0, 150, 60), (28, 56)),
    "tiny crop upscaled": (30, 40, (20, 3, 25, 9), (56, 56)),
}


@pytest.mark.parametrize("case", sorted(ROWS_CASES))
def test_crop_rows_triton_matches_reference(case):
    args = _rows_args(*ROWS_CASES[case], DEVICE, seed=len(case))
    expected = crop_patch_rows_reference(*args, 14, 2)
    _assert_rows_close(crop_kernels.crop_patch_rows_triton(*args, 14, 2), expected, case)


def test_crop_patch_embed_triton_backend():
    gen = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (45, 90, 3), dtype=torch.uint8, generator=gen).to(DEVICE)
    weight = torch.randn(16, 3, 2, 14, 14, generator=gen).to(DEVICE)
    for kwargs in ({}, {"weight": weight}):
        ours = crop_patch_embed(image, (5, 2, 88, 40), (28, 84), backend="triton", **kwargs)
        expected = crop_patch_embed(image, (5, 2, 88, 40), (28, 84), backend="torch", **kwargs)
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------- kv_splice


def _nan(shape, dtype, device=DEVICE):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _splice_case(layout, tokens, heads, dim, *, pad=3, skip=0.25, seed=0, new_dtype=torch.float32,
                 device=DEVICE, strided=False):
    """(k, v, cos, sin, slots, cache shape): random inputs with `pad` extra rows, a fraction of
    slots set to -1; engine layout (sequences, max_len, ...) or paged (blocks of 16)."""
    gen = torch.Generator().manual_seed(seed)
    rows = tokens + pad
    if strided:  # (heads, tokens, dim) storage seen as (tokens, heads, dim); cos/sin cut from wider tables
        k = torch.randn(heads, rows, dim, generator=gen).to(device).transpose(0, 1)
        v = torch.randn(heads, rows, dim, generator=gen).to(device).transpose(0, 1)
        cos = torch.randn(rows, dim + 5, generator=gen).to(device)[:, 2:dim + 2]
        sin = torch.randn(rows, 2 * dim, generator=gen).to(device)[:, ::2]
    else:
        k, v = torch.randn(rows, heads, dim, generator=gen), torch.randn(rows, heads, dim, generator=gen)
        cos, sin = torch.randn(rows, dim, generator=gen), torch.randn(rows, dim, generator=gen)
    if layout == "engine":
        shape = (4, 24 + tokens, heads, dim)
    else:
        shape = (math.ceil(tokens / BLOCK) + 2, BLOCK, heads, dim)
    slots = torch.randperm(shape[0] * shape[1], generator=gen)[:tokens]
    slots = torch.where(torch.rand(tokens, generator=gen) < skip, -1, slots)
    to = lambda t: t.to(device)  # noqa: E731
    return to(k.to(new_dtype)), to(v.to(new_dtype)), to(cos), to(sin), to(slots), shape




def _check_splice(splice, case, cache_dtype, rotate, what):
    k, v, cos, sin, slots, shape = case
    rot = (cos, sin) if rotate else (None, None)
    ours = [_nan(shape, cache_dtype, k.device) for _ in range(2)]
    expected = [_nan(shape, cache_dtype, k.device) for _ in range(2)]
    splice(k, v, *ours, slots, *rot)
    kv_splice_reference(k, v, *expected, slots, *rot)
    assert_same_values(ours[0], expected[0], f"keys, {what}")
    assert_same_values(ours[1], expected[1], f"values, {what}")
    written = int((slots >= 0).sum())
    assert int((~ours[1].isnan()).all(-1).all(-1).sum()) == written, f"{what}: rows written"


@pytest.mark.parametrize("rotate", [False, True], ids=["copy", "rotate"])
@pytest.mark.parametrize("tokens", [1, 5, 37])
@pytest.mark.parametrize("layout", ["engine", "paged"])
def test_kv_splice_triton_matches_reference(layout, tokens, rotate):
    for heads, dim in ((2, 8), (3, 24), (1, 64)):
        case = _splice_case(layout, tokens, heads, dim, seed=tokens * 13 + heads)
        _check_splice(splice_kernels.kv_splice_triton, case, torch.float32, rotate,
                      f"{layout} tokens={tokens} heads={heads} dim={dim}")


@pytest.mark.parametrize("rotate", [False, True], ids=["copy", "rotate"])
def test_kv_splice_triton_strided_inputs(rotate):
    case = _splice_case("paged", 19, 2, 16, strided=True, seed=3)
    assert not case[0].is_contiguous() and not case[2].is_contiguous()
    _check_splice(splice_kernels.kv_splice_triton, case, torch.float32, rotate, "strided")


def test_kv_splice_triton_half_cache():
    """float32 keys/values into a float16 cache: rounded once, like the reference."""
    case = _splice_case("paged", 21, 2, 16, seed=4)
    _check_splice(splice_kernels.kv_splice_triton, case, torch.float16, True, "fp16 cache")


def test_kv_splice_triton_writes_nothing_without_slots():
    k, v, cos, sin, _, shape = _splice_case("paged", 5, 2, 8, pad=0)
    k_cache, v_cache = _nan(shape, torch.float32), _nan(shape, torch.float32)
    splice_kernels.kv_splice_triton(k, v, k_cache, v_cache, torch.full((5,), -1, dtype=torch.int64, device=DEVICE), cos, sin)
    splice_kernels.kv_splice_triton(k, v, k_cache, v_cache, torch.zeros(0, dtype=torch.int64, device=DEVICE))
    assert bool(k_cache.isnan().all()) and bool(v_cache.isnan().all())


def test_kv_splice_triton_backend():
    case = _splice_case("engine", 7, 2, 8, seed=5)

    def splice(*args):
        kv_splice(*args, backend="triton")

    _check_splice(splice, case, torch.float32, True, "kv_splice(backend='triton')")


def test_kv_splice_op_registration():
    """vpt_fast::kv_splice passes torch.library's checks and compiles into a graph."""
    k, v, cos, sin, slots, shape = _splice_case("paged", 6, 2, 8, seed=6, device="cpu")
    args = (k, v, _nan(shape, torch.float32, "cpu"), _nan(shape, torch.float32, "cpu"), slots, cos, sin, "torch")
    torch.library.opcheck(torch.ops.vpt_fast.kv_splice.default, args)

    def step(k, v, k_cache, v_cache):
        torch.ops.vpt_fast.kv_splice(k * 2, v, k_cache, v_cache, slots, cos, sin, "torch")
        return k_cache.sum(dim=(1, 2, 3))

    eager = [_nan(shape, torch.float32, "cpu").nan_to_num(0.0) for _ in range(2)]
    compiled = [c.clone() for c in eager]
    expected = step(k, v, *eager)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(k, v, *compiled)
    torch.testing.assert_close(got, expected)
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])


@pytest.mark.parametrize("op", ["crop_patch_rows", "kv_splice"])
def test_cpp_extension_matches_reference(op):
    _extension_or_skip(op, "cpu")
    if op == "kv_splice":
        for rotate in (False, True):
            case = _splice_case("paged", 37, 2, 24, seed=7, device="cpu")
            _check_splice(torch.ops.vpt_fast_ext.kv_splice, case, torch.float32, rotate, "cpp")
    else:
        for case in ROWS_CASES.values():
            args = _rows_args(*case, "cpu")
            _assert_rows_close(torch.ops.vpt_fast_ext.crop_patch_rows(*args, 14, 2),
                               crop_patch_rows_reference(*args, 14, 2), "cpp")


# ----------------------------------------------------------------------------- GPU only


def _gpu_splice(backend: str, op: str = "kv_splice"):
    if backend == "cuda":
        _extension_or_skip(op, "cuda")
        return torch.ops.vpt_fast_ext.kv_splice
    return splice_kernels.kv_splice_triton


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="no CUDA")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_crop_rows(backend):
    if backend == "cuda":
        _extension_or_skip("crop_patch_rows", "cuda")
        rows = torch.ops.vpt_fast_ext.crop_patch_rows
    else:
        rows = crop_kernels.crop_patch_rows_triton
    cases = {**ROWS_CASES,
             "big image, cap": (900, 1500, (0, 0, 1500, 900), (308, 504)),
             "big crop": (1080, 1920, (301, 97, 1777, 1040), (336, 504)),
             "aspect clamp": (28, 9000, (0, 0, 9000, 28), (28, 5040)),
             "odd": (333, 517, (7, 11, 290, 301), (280, 280))}
    for name, case in cases.items():
        max_side = 20000 if name == "aspect clamp" else 512
        args = _rows_args(*case, "cuda", seed=len(name), max_side=max_side)
        _assert_rows_close(rows(*args, 14, 2), crop_patch_rows_reference(*args, 14, 2), f"{backend}: {name}")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="no CUDA")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_crop_patch_embed_dispatch(backend):
    if backend == "cuda":
        _extension_or_skip("crop_patch_rows", "cuda")
    gen = torch.Generator().manual_seed(2)
    image = torch.randint(0, 256, (480, 640, 3), dtype=torch.uint8, generator=gen).cuda()
    weight = torch.randn(1280, 3, 2, 14, 14, generator=gen).cuda()
    box, out_hw = (40, 30, 600, 420), (392, 560)
    frame = lambda rows: rows.view(-1, 3, 2, 196)[:, :, 0].reshape(-1, 588)  # both temporal frames are equal
    single = frame(crop_patch_embed(image, box, out_hw, backend=backend))
    _assert_rows_close(single, frame(crop_patch_embed(image, box, out_hw, backend="torch")), f"{backend}: rows")
    # embeddings: the backend's own rows times the temporal-summed weight (the rows were checked above)
    for w, tol in ((weight, 1e-4), (weight.bfloat16(), 2e-2)):
        ours = crop_patch_embed(image, box, out_hw, backend=backend, weight=w)
        expected = single.to(w.dtype) @ w.sum(dim=2).reshape(w.shape[0], -1).T
        assert ours.dtype == w.dtype and ours.shape == expected.shape
        scale = float(expected.float().abs().max())
        assert float((ours.float() - expected.float()).abs().max()) <= tol * max(scale, 1.0), w.dtype
    automatic = crop_patch_embed(image, (40, 30, 600, 420), (392, 560))
    assert automatic.is_cuda and automatic.shape == (1120, 1176)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="no CUDA")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_kv_splice(backend):
    splice = _gpu_splice(backend)
    for layout in ("engine", "paged"):
        for tokens in (1, 37, 300):
            for heads, dim in ((2, 8), (3, 24), (4, 128), (28, 128)):
                case = _splice_case(layout, tokens, heads, dim, seed=tokens + heads, device="cuda")
                for rotate in (False, True):
                    what = f"{backend} {layout} tokens={tokens} heads={heads} dim={dim} rotate={rotate}"
                    _check_splice(splice, case, torch.float32, rotate, what)
                    _check_splice(splice, case, torch.bfloat16, rotate, "bf16 cache, " + what)
                    _check_splice(splice, case, torch.float16, rotate, "fp16 cache, " + what)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="no CUDA")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_kv_splice_bf16_inputs(backend):
    """bf16 keys/values/caches: copies are exact; rotated keys agree with the reference when cos/sin
    are float32 (both rotate in float32), and are at least as accurate when they are bf16 too."""
    splice = _gpu_splice(backend)
    case = _splice_case("paged", 77, 4, 128, seed=9, new_dtype=torch.bfloat16, device="cuda")
    _check_splice(splice, case, torch.bfloat16, False, f"{backend} bf16 copy")
    _check_splice(splice, case, torch.bfloat16, True, f"{backend} bf16 with float32 cos/sin")
    k, v, cos, sin, slots, shape = case
    ours, ref = _nan(shape, torch.bfloat16, "cuda"), _nan(shape, torch.bfloat16, "cuda")
    splice(k, v, ours, _nan(shape, torch.bfloat16, "cuda"), slots, cos.bfloat16(), sin.bfloat16())
    kv_splice_reference(k, v, ref, _nan(shape, torch.bfloat16, "cuda"), slots, cos.bfloat16(), sin.bfloat16())
    exact = _nan(shape, torch.float32, "cuda")
    kv_splice_reference(k.float(), v.float(), exact, _nan(shape, torch.float32, "cuda"), slots,
                        cos.bfloat16().float(), sin.bfloat16().float())
    written = ~exact.isnan()
    assert float((ours.float() - exact)[written].abs().max()) <= float((ref.float() - exact)[written].abs().max())


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="no CUDA")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_kv_splice_large(backend):
    """4096 tokens x 8 heads x 128 (4M values per cache), paged, into fp32 and bf16 caches."""
    splice = _gpu_splice(backend)
    case = _splice_case("paged", 4096, 8, 128, pad=64, skip=0.1, seed=10, device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        _check_splice(splice, case, dtype, True, f"{backend} large {dtype}")
    _check_splice(splice, case, torch.float32, False, f"{backend} large copy")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="no CUDA")
def test_gpu_kv_splice_dispatch_and_graph_capture():
    k, v, cos, sin, slots, shape = _splice_case("engine", 8, 2, 64, skip=0.0, seed=11, device="cuda")
    k_cache, v_cache = torch.zeros(shape, device="cuda"), torch.zeros(shape, device="cuda")
    expected = [c.clone() for c in (k_cache, v_cache)]
    kv_splice_reference(k, v, *expected, slots, cos, sin)
    kv_splice(k, v, k_cache, v_cache, slots, cos, sin)  # automatic choice: cuda or triton
    assert_same_values(k_cache, expected[0], "automatic backend")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kv_splice(k, v, k_cache, v_cache, slots, cos, sin)
    k_cache.zero_()
    v_cache.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert_same_values(k_cache, expected[0], "replayed graph, keys")
    assert_same_values(v_cache, expected[1], "replayed graph, values")
