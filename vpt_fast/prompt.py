"""Conversation text and token ids, as the two-round flow builds them (docs/vpt.md §7).

Shared by the reference pipeline and the engine: both must encode exactly the same
conversation, so this is the one place that knows the template, the image spans and
the fixed round-2 texts.

A user's prompt is text: it may not hold the text of a special token (`<|image_pad|>`,
`<|im_end|>`, a VPT token, ...), which the tokenizer would read as that token and so
change the conversation's structure or its image-pad count. Such a prompt is refused
(`check_user_text`), never silently altered; the image goes where `<image>` stands.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any, Sequence

from . import _hf_compat, spec
from .preprocess import load_image

IMAGE_PLACEHOLDER = "<image>"


def special_token_pattern(tokenizer) -> re.Pattern:
    """A pattern matching the text of every special token the tokenizer parses out of text."""
    texts = _hf_compat.special_token_texts(tokenizer)
    texts |= {spec.IM_START, spec.IM_END, spec.VISION_START, spec.VISION_END, spec.IMAGE_PAD}
    return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))


def check_user_text(text: str, specials: re.Pattern) -> None:
    """Refuse a prompt that is not a str, is not valid Unicode, or types a special token."""
    if not isinstance(text, str):
        raise TypeError(f"a prompt must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        raise ValueError(f"the prompt is not valid Unicode text: it holds the lone surrogate {bad!r} "
                         f"at character {e.start}") from None
    found = specials.search(text)
    if found:
        raise ValueError(f"the prompt holds the special token text {found.group()!r} at character {found.start()}: "
                         f"special tokens cannot be typed in a prompt (place the image with {IMAGE_PLACEHOLDER!r})")


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


_ENCODE_LOCK = threading.Lock()


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of a conversation text (special-token text is parsed as those tokens).

    Serialised: a fast tokenizer used from several threads at once (requests prepared in
    their callers' threads, splices in the engine's) can fail with "Already borrowed"."""
    with _ENCODE_LOCK:
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


@dataclass(frozen=True)
class FirstTurn:
    """A request's image and prompt, made ready for round 1."""

    original: Any  # the image as loaded (PIL), for crops and re-encoding
    first: Any  # it capped: the conversation's first image
    user: str  # the user turn's content, image span included
    ids: list[int]  # the round-1 prompt: system turn, user turn, assistant header


def first_turn(bundle, image, prompt: str, specials: re.Pattern) -> FirstTurn:
    """Load and check one request's image and prompt and encode its round-1 prompt.

    Raises TypeError / ValueError / OSError with a message naming what is wrong; the
    image-pad count of the result is always the image's own token count."""
    check_user_text(prompt, specials)
    original = load_image(image)
    first = bundle.processor.prepare(original)
    n = bundle.processor.token_count(first)
    user = user_content(prompt, vision_span(spec.IMAGE_PAD, n))
    ids = encode(bundle.tokenizer, conversation([("user", user)]))
    got = ids.count(bundle.vocab.image_pad)
    if got != n:
        raise ValueError(f"the prompt encodes to {got} image pad tokens where the image has {n}")
    return FirstTurn(original, first, user, ids)
