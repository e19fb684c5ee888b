"""Request validation and next-token choice, shared by the reference pipeline and the engine."""

from __future__ import annotations

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


def check_requests(bundle, images, prompts, forced_tokens):
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
    if len(forced_tokens) != len(prompts):
        raise ValueError(f"forced_tokens has {len(forced_tokens)} entries for {len(prompts)} requests")
    vocab_size = bundle.model.config.text_config.vocab_size
    out = []
    for i, f in enumerate(forced_tokens):
        if f is None:
            out.append(None)
            continue
        f = [int(t) if isinstance(t, int) or (hasattr(t, "__int__") and not isinstance(t, (str, float))) else t for t in f]
        bad = [t for t in f if not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"forced_tokens[{i}] holds {bad[:5]}: token ids in [0, {vocab_size}) expected")
        out.append(f)
    return out
