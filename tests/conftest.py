"""Shared fixtures: tiny VPT checkpoints (built once per test session) and their loaded bundles."""

from __future__ import annotations

import os

import pytest

# Everything the tests need is on disk: never reach the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

# Without a GPU, Triton kernels run in Triton's interpreter. It must be on before anything
# imports triton (transformers may), or triton's own helpers are compiled-only.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vpt_fast.checkpoint import load_vpt_checkpoint
from vpt_fast.tiny import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """``tiny_ckpt(variant) -> Path``: a tiny checkpoint folder in the released format.

    Built once per variant and shared by every test: tests that alter files must copy it first.
    """
    cache = {}

    def get(variant: str):
        if variant not in cache:
            root = tmp_path_factory.mktemp(f"tiny_{variant}")
            cache[variant] = make_tiny_checkpoint(root / variant, variant)
        return cache[variant]

    return get


@pytest.fixture(scope="session")
def tiny_bundle(tiny_ckpt):
    """``tiny_bundle(variant) -> VPTBundle``: ``load_vpt_checkpoint`` of ``tiny_ckpt(variant)``, cached."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            cache[variant] = load_vpt_checkpoint(tiny_ckpt(variant))
        return cache[variant]

    return get
