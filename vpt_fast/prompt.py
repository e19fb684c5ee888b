"""Conversation text and token ids, as the two-round flow builds them (VPT_SPEC 7).

Shared by the reference pipeline and the engine: both must encode exactly the same
conversation, so this is the one place that knows the template, the image spans and
the fixed round-2 texts.
"""

from __future__ import annotations

from typing import Sequence

from . import spec

IMAGE_PLACEHOLDER = "<image>"


def vision_span(pad_token: str, count: int) -> str:
    return spec.VISION_START + pad_token * count + spec.VISION_END


def user_content(prompt: str, image_span: str) -> str:
    """The user's text with its one `<image>` placeholder replaced (image first when absent)."""
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a str, got {type(prompt).__name__}")
    n = prompt.count(IMAGE_PLACEHOLDER)
    if n > 1:
        raise ValueError(f"a prompt may hold at most one {IMAGE_PLACEHOLDER!r} placeholder (one image per request), got {n}")
    if n == 0:
        return image_span + prompt
    return prompt.replace(IMAGE_PLACEHOLDER, image_span)


def conversation(turns: Sequence[tuple[str, str]]) -> str:
    """Qwen2-VL chat text: system prompt, then (role, content) turns, then the assistant header."""
    text = f"{spec.IM_START}system\n{spec.SYSTEM_PROMPT}{spec.IM_END}\n"
    for role, content in turns:
        text += f"{spec.IM_START}{role}\n{content}{spec.IM_END}\n"
    return text + f"{spec.IM_START}assistant\n"


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def region_prompt(n_crops: int, crop_spans: Sequence[str]) -> str:
    """Round-2 user turn for region crops: the crop alone, or "Region i: <crop>\\n" for several."""
    if n_crops == 1:
        return crop_spans[0]
    return "".join(f"Region {i}: {span}\n" for i, span in enumerate(crop_spans))


def action_text(kind: str) -> str:
    """The fixed assistant turn of a re-encoding request: start, action and end tokens."""
    t = spec.ACTION_TOKENS[kind]
    return t.start + t.action + t.end


def body_of(ids: list[int], eos: int) -> list[int]:
    """A round's ids without its closing end-of-turn token."""
    return ids[:-1] if ids and ids[-1] == eos else ids


def cut_at_eos(ids: list[int], eos: int) -> list[int]:
    """Ids up to and including the first end-of-turn token (all of them when there is none)."""
    return ids[: ids.index(eos) + 1] if eos in ids else ids
