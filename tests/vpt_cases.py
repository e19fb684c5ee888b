"""Inputs shared by the engine tests: random images, scripted round-1 texts, result comparison."""

from __future__ import annotations

import numpy as np
from PIL import Image

PREFIX = {"clip": "clip", "dino": "detection", "sam": "seg"}


def rand_image(w, h, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def toks(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def region(*blocks, eos=True):
    """A round-1 text naming one region block per (xs, ys)."""
    out = ""
    for xs, ys in blocks:
        out += "<|region_token_start|>" + "".join(f"<|x_{x}|>" for x in xs) + "".join(f"<|y_{y}|>" for y in ys)
        out += "<|region_token_end|>"
    return out + ("<|im_end|>" if eos else "")


def action(kind, eos=True):
    """A round-1 text asking for a re-encoding of `kind`."""
    p = PREFIX[kind]
    return f"<|{p}_action_start|><|{p}_action|><|{p}_action_end|>" + ("<|im_end|>" if eos else "")


def assert_same_result(got, want, tol=1e-4, what=""):
    """Two engine results agree: the same tokens, reason and looks, logits within tol."""
    assert got.token_ids == want.token_ids, what
    assert got.round1_ids == want.round1_ids and got.answer_ids == want.answer_ids, what
    assert got.finish_reason == want.finish_reason, what
    assert [(t.kind, t.boxes, t.tokens_spliced, t.tokens_rolled_back) for t in got.trace] == \
        [(t.kind, t.boxes, t.tokens_spliced, t.tokens_rolled_back) for t in want.trace], what
    if want.logits is not None:
        assert len(got.logits) == len(want.logits), what
        worst = max(((a - b).abs().max().item() for a, b in zip(got.logits, want.logits)), default=0.0)
        assert worst <= tol, f"{what}: logits differ by {worst:.3g}"
