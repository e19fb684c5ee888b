"""Backend choice: once per op and device type, asked for by name (VPT_FAST_BACKEND, set_backend,
an engine's backend=) or automatic; a backend asked for that cannot run raises."""

import logging

import pytest
import torch
from op_cases import can_run

from vpt_fast import ops
from vpt_fast.ops import BackendUnavailable, _registry, set_backend


@pytest.fixture
def fresh(monkeypatch):
    """An empty choice table and no request, restored afterwards."""
    monkeypatch.setattr(_registry, "_chosen", {})
    monkeypatch.setattr(_registry, "_request", None)
    monkeypatch.delenv("VPT_FAST_BACKEND", raising=False)
    return monkeypatch


def fake_statuses(monkeypatch, op, **statuses):
    """Replace the availability of an op's backends: name -> True or a reason."""
    table = dict(_registry._OPS[op])
    for name, status in statuses.items():
        table[name] = (lambda s: lambda device_type: s)(status)
    monkeypatch.setitem(_registry._OPS, op, table)


def test_every_op_is_registered_with_its_backends():
    assert _registry.ops() == {
        "kv_splice": ("torch", "triton", "ext"), "decode_attention": ("torch", "triton", "flash_attn"),
        "prefill_attention": ("torch", "triton"), "crop_patch_rows": ("torch", "triton", "ext"),
        "add_rms_norm": ("torch", "triton"), "rms_norm": ("torch", "triton"), "silu_mul": ("torch", "triton")}
    for op in _registry.ops():
        assert hasattr(torch.ops.vpt_fast, op)


def test_automatic_choice_order_and_triton_never_on_cpu(fresh):
    fake_statuses(fresh, "kv_splice", triton=True, ext=True)
    assert _registry.backend("kv_splice", "cpu") == "ext"
    assert _registry.backend("kv_splice", "cuda") == "ext"
    fake_statuses(fresh, "crop_patch_rows", triton=True, ext="not built")
    assert _registry.backend("crop_patch_rows", "cpu") == "torch"  # the interpreter is a testing tool
    assert _registry.backend("crop_patch_rows", "cuda") == "triton"
    fake_statuses(fresh, "decode_attention", triton="no triton", flash_attn=True)
    assert _registry.backend("decode_attention", "cuda") == "torch"  # flash_attn only when asked for
    assert _registry.chosen()[("kv_splice", "cpu")] == "ext"


def test_a_choice_is_made_once_and_logged_once(fresh, caplog):
    calls = []
    table = dict(_registry._OPS["kv_splice"], ext=lambda device_type: calls.append(device_type) or "not built here")
    fresh.setitem(_registry._OPS, "kv_splice", table)
    k = torch.randn(2, 2, 8)
    cache = torch.zeros(2, 4, 2, 8)
    with caplog.at_level(logging.INFO, logger="vpt_fast.ops"):
        for _ in range(3):
            ops.kv_splice(k, k, cache, cache.clone(), torch.tensor([0, 1]))
    assert calls == ["cpu"]
    assert [r.getMessage() for r in caplog.records] == ["kv_splice on cpu: backend torch; not available: ext (not built here)"]


def test_a_backend_asked_for_must_run(fresh):
    fake_statuses(fresh, "kv_splice", triton="triton is not installed", ext="not built")
    fresh.setenv("VPT_FAST_BACKEND", "triton")
    k = torch.randn(2, 2, 8)
    cache = torch.zeros(2, 4, 2, 8)
    with pytest.raises(BackendUnavailable, match="kv_splice: backend 'triton' was asked for but cannot run on cpu "
                                                 "tensors: triton is not installed"):
        ops.kv_splice(k, k, cache, cache.clone(), torch.tensor([0, 1]))
    assert not cache.any()  # nothing was written


def test_requests_by_name_and_per_op(fresh):
    fresh.setenv("VPT_FAST_BACKEND", "torch")
    assert all(_registry.backend(op, "cpu") == "torch" for op in _registry.ops())
    fresh.setattr(_registry, "_chosen", {})
    set_backend("kv_splice=torch, silu_mul=torch")
    assert _registry._requested("kv_splice") == "torch" and _registry._requested("decode_attention") is None
    set_backend("flash_attn")  # a name applies to the ops that have such a backend
    assert _registry._requested("decode_attention") == "flash_attn" and _registry._requested("kv_splice") is None
    set_backend({"prefill_attention": "triton"})
    assert _registry._requested("prefill_attention") == "triton"
    set_backend(None)
    assert _registry._requested("prefill_attention") is None


@pytest.mark.parametrize("spec,message", [
    ("cuda", r"backend must be one of \('torch', 'triton', 'ext', 'flash_attn'\), got 'cuda'"),
    ("kv_splice=opencl", "got 'opencl' for kv_splice"),
    ("matmul=torch", "no op named 'matmul'"),
    ("kv_splice=flash_attn", "kv_splice has no 'flash_attn' backend"),
])
def test_bad_requests(fresh, spec, message):
    with pytest.raises(ValueError, match=message):
        set_backend(spec)
    fresh.setenv("VPT_FAST_BACKEND", spec)
    with pytest.raises(ValueError, match=message):
        _registry.backend("kv_splice", "cpu")


def test_a_choice_made_cannot_change(fresh):
    assert _registry.backend("silu_mul", "cpu") == "torch"
    set_backend("silu_mul=torch")  # the same: fine
    with pytest.raises(RuntimeError, match="silu_mul already runs on the torch backend for cpu tensors"):
        set_backend("silu_mul=triton")


def test_an_engine_asks_for_its_backend(fresh, tiny_bundle):
    from vpt_fast.engine import Engine

    Engine(tiny_bundle("region"), backend="torch", kv_cache_tokens=64)
    assert _registry._requested("kv_splice") == "torch"
    if can_run("kv_splice", "ext") is True:
        _registry.backend("kv_splice", "cpu")
        with pytest.raises(RuntimeError, match="a backend is chosen once"):
            Engine(tiny_bundle("region"), backend="kv_splice=ext", kv_cache_tokens=64)
