"""Request validation and next-token choice, shared by the reference pipeline and the engine."""

from __future__ import annotations

import operator
from typing import Sequence

import torch


def sample(scores: torch.Tensor, do_sample: bool, top_k, top_p, generator) -> torch.Tensor:
    """Next tokens (B,) from scores (B, vocab): argmax, or top-k / top-p sampling as transformers does."""
    if not do_sample:
        return scores.argmax(-1)
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None and top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def check_batch(images, prompts, forced_tokens) -> list:
    """Check the shape of a call (one image and one prompt per request, forced_tokens matching);
    returns forced_tokens as a list with one entry per request. What is wrong with a single
    request (its image, prompt or forced tokens) is left to the per-request checks."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be a list of str (one per request)")
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise TypeError("images must be a list (one path or PIL image per request)")
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts: one image per request expected")
    if not prompts:
        raise ValueError("no requests given")
    if forced_tokens is None:
        return [None] * len(prompts)
    if isinstance(forced_tokens, (str, bytes)) or not isinstance(forced_tokens, Sequence):
        raise TypeError(f"forced_tokens must be a list with one entry (None or token ids) per request, "
                        f"got {type(forced_tokens).__name__}")
    if len(forced_tokens) != len(prompts):
        raise ValueError(f"forced_tokens has {len(forced_tokens)} entries for {len(prompts)} requests")
    return list(forced_tokens)


def check_forced(forced, vocab_size: int) -> list[int] | None:
    """One request's forced tokens as a list of ints in [0, vocab_size), or None."""
    if forced is None:
        return None
    if isinstance(forced, torch.Tensor):
        forced = forced.tolist()
    if isinstance(forced, (str, bytes)) or not isinstance(forced, Sequence):
        raise TypeError(f"forced tokens must be a list of token ids, got {type(forced).__name__}")
    out, bad = [], []
    for t in forced:
        try:
            value = None if isinstance(t, bool) else operator.index(t)
        except TypeError:
            value = None
        if value is None or not 0 <= value < vocab_size:
            bad.append(t)
        else:
            out.append(value)
    if bad:
        raise ValueError(f"forced tokens hold {bad[:5]}: token ids in [0, {vocab_size}) expected")
    return out
