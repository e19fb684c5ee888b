"""Chat messages (OpenAI's and Hugging Face's shapes) to what the engine takes: the images and a
`Conversation`. The one conversion the OpenAI-compatible server and `Engine.chat` share.

    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "image", "image": "street.jpg"},
                                             {"type": "text", "text": "What does the sign say?"}]}]
    images, conversation = from_messages(messages)

Roles: "system" (or "developer"; several are joined by newlines), "user", "assistant". A
content is a str or a list of parts: {"type": "text", "text": ...}, {"type": "image_url",
"image_url": {"url": ...}} (OpenAI) or {"type": "image", "image": PIL image | path} (Hugging
Face). Any number of images, in user turns; each goes where its part stands among the text
parts, which are joined as they are (Qwen2-VL's chat template adds nothing between parts).
A text part may not hold `<image>`: here an image's place is its part.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from . import spec
from .prompt import IMAGE_PLACEHOLDER, Conversation

MODES = ("region", "reencode", "free")
TRIGGERS = {"region": spec.REGION_TRIGGER, "reencode": spec.REENCODE_TRIGGER, "free": None}


def with_trigger(text: str, mode: str | None) -> str:
    """The user's text with the trigger sentence the prompted VPT models were trained with:
    "region" or "reencode"; "free" or None adds nothing (the free-choice model needs none)."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"the VPT mode must be one of {MODES}, got {mode!r}")
    trigger = TRIGGERS.get(mode)
    return f"{text.rstrip()} {trigger}." if trigger else text


def question_prompt(question: str, mode: str | None, images: int = 1) -> str:
    """The prompt of a question about a request's images, as the published evaluation asks it:
    the images first (unless the question places them with `<image>`), the trigger sentence of
    `mode`."""
    text = with_trigger(question.rstrip(), mode)
    return text if IMAGE_PLACEHOLDER in text or not images else IMAGE_PLACEHOLDER * images + "\n" + text


def _image_of(part: Mapping[str, Any], where: str) -> Any:
    kind = part.get("type")
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, Mapping) else url
        if not isinstance(url, str) or not url:
            raise ValueError(f"{where}: an image_url part needs {{'image_url': {{'url': ...}}}}")
        return url
    image = part.get("image")
    if image is None:
        raise ValueError(f"{where}: an image part needs {{'image': <PIL image or path>}}")
    return image


def _content(content: Any, where: str, allow_image: bool) -> tuple[str, list]:
    """(text with `<image>` where each image stands, the images) of one message's content."""
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        parts = list(content)
    else:
        raise ValueError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")
    texts, images = [], []
    for j, part in enumerate(parts):
        at = f"{where}, part {j}"
        if not isinstance(part, Mapping):
            raise ValueError(f"{at}: a part must be an object with a 'type', got {type(part).__name__}")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise ValueError(f"{at}: a text part needs a string 'text'")
            if IMAGE_PLACEHOLDER in text:
                raise ValueError(f"{at}: the text holds {IMAGE_PLACEHOLDER!r}; send the image as an image part instead")
            texts.append(text)
        elif kind in ("image_url", "image"):
            if not allow_image:
                raise ValueError(f"{at}: only user messages may carry an image")
            images.append((_image_of(part, at), at))
            texts.append(IMAGE_PLACEHOLDER)
        else:
            raise ValueError(f"{at}: unknown part type {kind!r} (expected 'text', 'image_url' or 'image')")
    return "".join(texts), images


def from_messages(messages: Sequence[Mapping[str, Any]], *, mode: str | None = None,
                  resolve_image: Callable[[Any], Any] | None = None,
                  max_images: int | None = None) -> tuple[list, Conversation]:
    """(images, Conversation) of chat messages: the images (none for a text-only chat) in the
    order the messages show them, each standing where its `<image>` is in the conversation;
    ValueError naming the message otherwise.

    mode appends the trigger sentence to the last user message (see `with_trigger`);
    resolve_image turns an image part's value (a URL, a path, a PIL image) into what the
    engine loads (default: the value itself); max_images refuses a conversation with more
    images than that, naming the part past the limit, before any image is resolved."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    system, turns, images = [], [], []
    for i, message in enumerate(messages):
        where = f"message {i}"
        if not isinstance(message, Mapping):
            raise ValueError(f"{where}: a message must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise ValueError(f"{where}: unknown role {role!r} (expected 'system', 'user' or 'assistant')")
        if message.get("content") is None:
            raise ValueError(f"{where}: the content is missing")
        text, found = _content(message["content"], where, allow_image=role == "user")
        images += found
        if max_images is not None and len(images) > max_images:
            raise ValueError(f"{images[max_images][1]}: at most {max_images} image(s) may be given in one prompt "
                             f"(limit_mm_per_prompt)")
        if role in ("system", "developer"):
            if turns:
                raise ValueError(f"{where}: a system message must come before the conversation's turns")
            system.append(text)
        else:
            turns.append((role, text))
    if not turns or turns[-1][0] != "user":
        raise ValueError("the last message must be the user's")
    turns[-1] = ("user", with_trigger(turns[-1][1], mode))
    chat = Conversation(tuple(turns), "\n".join(system)) if system else Conversation(tuple(turns))
    found = [image for image, _ in images]
    if resolve_image is not None:
        found = [resolve_image(image) for image in found]
    return found, chat
