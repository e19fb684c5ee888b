"""Conversation text and token ids, as the two-round flow builds them (docs/vpt.md §7).

Shared by the reference pipeline and the engine: both must encode exactly the same
conversation, so this is the one place that knows the template, the image spans and
the fixed round-2 texts.

A user's prompt is text: it may not hold the text of a special token (`<|image_pad|>`,
`<|im_end|>`, a VPT token, ...), which the tokenizer would read as that token and so
change the conversation's structure or its image-pad count. Such a prompt is refused
(`check_user_text`), never silently altered; each image goes where its `<image>` stands.
"""

from __future__ import annotations

import re
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

from . import _hf_compat, spec
from .preprocess import PixelImage, load_image

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


def user_content(prompt: str, *image_spans: str) -> str:
    """The user's text with its `<image>` placeholders replaced by the image spans, in order;
    without placeholders the spans open the text (as Qwen2-VL's chat template writes image
    parts before the text). ValueError when placeholders and spans do not pair up."""
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a str, got {type(prompt).__name__}")
    n = prompt.count(IMAGE_PLACEHOLDER)
    if n == 0:
        return "".join(image_spans) + prompt
    if n != len(image_spans):
        raise ValueError(f"the prompt places {n} image(s) with {IMAGE_PLACEHOLDER!r} but {len(image_spans)} "
                         f"image(s) were given: one {IMAGE_PLACEHOLDER!r} per image, or none")
    pieces = prompt.split(IMAGE_PLACEHOLDER)
    return pieces[0] + "".join(span + rest for span, rest in zip(image_spans, pieces[1:]))


def image_list(images) -> list:
    """A request's images as a list: None is no image, a list or tuple holds several (in the
    order the conversation shows them), anything else is one image."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def runs(ids: list[int], token: int, start: int = 0, stop: int | None = None) -> list[tuple[int, int]]:
    """(start, length) of every maximal run of `token` that starts in ids[start:stop]."""
    stop = len(ids) if stop is None else stop
    out, i = [], start
    while i < stop:
        if ids[i] == token and (i == 0 or ids[i - 1] != token):
            j = i
            while j < len(ids) and ids[j] == token:
                j += 1
            out.append((i, j - i))
            i = j
        else:
            i += 1
    return out


def conversation(turns: Sequence[tuple[str, str]], system: str = spec.SYSTEM_PROMPT) -> str:
    """Qwen2-VL chat text: the system turn, then (role, content) turns, then the assistant header."""
    text = f"{spec.IM_START}system\n{system}{spec.IM_END}\n"
    for role, content in turns:
        text += f"{spec.IM_START}{role}\n{content}{spec.IM_END}\n"
    return text + f"{spec.IM_START}assistant\n"


_ENCODE_LOCK = threading.Lock()  # for slow (pure Python) tokenizers only
_ENCODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> its private Rust encoder


def _encoder(tokenizer):
    """A private copy of a fast tokenizer's Rust backend (None for a slow tokenizer). Nothing
    ever reconfigures it, so any number of threads encode with it at once; transformers' own
    call sets truncation and padding on the shared backend each time, which fails ("Already
    borrowed") when threads overlap."""
    try:
        found = _ENCODERS.get(tokenizer)
    except TypeError:  # not weakly referenceable: no copy to keep, so it takes turns as a slow one does
        return None
    if found is not None:
        return found
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    private = Tokenizer.from_str(backend.to_str())
    private.no_truncation()
    private.no_padding()
    with _ENCODE_LOCK:
        return _ENCODERS.setdefault(tokenizer, private)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of a conversation text (special-token text is parsed as those tokens), as
    `tokenizer(text, add_special_tokens=False)` gives them. A fast tokenizer encodes through a
    private copy of its backend with Python's lock released, so a long text in one thread
    stalls neither other encodes nor the server's event loop; a slow one takes turns."""
    encoder = _encoder(tokenizer)
    if encoder is not None:
        return encoder.encode_batch([text], add_special_tokens=False)[0].ids
    with _ENCODE_LOCK:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def script_ids(tokenizer, text: str) -> list[int]:
    """Token ids of round-1 tokens scripted as text (`--force`, `vpt_force`), special-token
    text parsed as those tokens; ValueError when the text encodes to no tokens."""
    ids = encode(tokenizer, text)
    if not ids:
        raise ValueError(f"the scripted tokens {text!r} encode to no tokens")
    return ids


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


ROLES = ("user", "assistant")


@dataclass(frozen=True)
class Conversation:
    """A chat to continue: (role, text) turns, "user" or "assistant", the last one the user's; an
    `<image>` placeholder in a user turn for each image of the request, in order (without any,
    the images open the first user turn); and the system prompt (the one VPT models were
    trained with by default)."""

    turns: tuple[tuple[str, str], ...]
    system: str = spec.SYSTEM_PROMPT

    def __post_init__(self) -> None:
        if isinstance(self.turns, (str, bytes)) or not isinstance(self.turns, Sequence) or not self.turns:
            raise TypeError(f"a conversation's turns must be a non-empty list of (role, text), got {self.turns!r}")
        turns = []
        for i, turn in enumerate(self.turns):
            if not isinstance(turn, Sequence) or isinstance(turn, (str, bytes)) or len(turn) != 2:
                raise TypeError(f"turn {i} must be (role, text), got {turn!r}")
            role, text = turn
            if role not in ROLES:
                raise ValueError(f"turn {i} has role {role!r}: expected one of {ROLES} (the system prompt is separate)")
            if not isinstance(text, str):
                raise TypeError(f"turn {i} text must be a str, got {type(text).__name__}")
            turns.append((role, text))
        if turns[-1][0] != "user":
            raise ValueError("the last turn of a conversation must be the user's")
        if not isinstance(self.system, str):
            raise TypeError(f"the system prompt must be a str, got {type(self.system).__name__}")
        object.__setattr__(self, "turns", tuple(turns))


def as_conversation(prompt) -> Conversation:
    """A prompt (a str: one user turn) or a Conversation, as a Conversation."""
    if isinstance(prompt, Conversation):
        return prompt
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a str or a Conversation, got {type(prompt).__name__}")
    return Conversation((("user", prompt),))


@dataclass(frozen=True)
class TokenPrompt:
    """A round-1 prompt given as token ids, as a transformers processor makes them (padding
    removed): each image's `<|image_pad|>` run already expanded to its token count. When the
    ids are a chat conversation in Qwen2-VL's template (system turn, user and assistant
    turns, the assistant header last), a perception continues it as the two-round flow
    would; other ids (a raw prompt) are run as they are, and a request for a perception then
    finishes with reason "error", as there is no conversation to write the next turn in."""

    ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if isinstance(self.ids, (str, bytes)) or not isinstance(self.ids, Sequence) or not self.ids:
            raise TypeError(f"a token prompt needs a non-empty sequence of token ids, got {self.ids!r}")
        object.__setattr__(self, "ids", tuple(int(t) for t in self.ids))


_TURN = re.compile(re.escape(spec.IM_START) + r"(system|user|assistant)\n(.*?)" + re.escape(spec.IM_END) + r"\n", re.S)


def parse_conversation(tokenizer, ids: Sequence[int]) -> tuple[str, tuple[tuple[str, str], ...]] | None:
    """(system prompt, turns) of ids in the template `conversation` writes (turn contents
    keep their image spans), or None when the ids are not exactly such a conversation."""
    text = tokenizer.decode(list(ids), skip_special_tokens=False)
    header = spec.IM_START + "assistant\n"
    if not text.endswith(header):
        return None
    body, at, turns = text[: -len(header)], 0, []
    for m in _TURN.finditer(body):
        if m.start() != at:
            return None
        turns.append((m.group(1), m.group(2)))
        at = m.end()
    if at != len(body) or not turns or turns[0][0] != "system" or len(turns) < 2:
        return None
    system, rest = turns[0][1], tuple(turns[1:])
    if any(role == "system" for role, _ in rest) or rest[-1][0] != "user":
        return None
    if encode(tokenizer, conversation(rest, system)) != list(ids):
        return None
    return system, rest


@dataclass(frozen=True)
class FirstTurn:
    """A request's images and conversation, made ready for round 1."""

    originals: tuple  # every image as loaded (PIL), in the order the conversation shows them
    images: tuple  # each made ready (capped, or a PixelImage): the images of the round-1 prompt
    turns: tuple[tuple[str, str], ...] | None  # the conversation's turns, the image spans in place of
    # `<image>`; None for a TokenPrompt that is not a chat conversation
    system: str
    ids: list[int]  # the round-1 prompt: system turn, the turns, assistant header

    @property
    def original(self):
        """The image a perception looks at, as loaded: the conversation's first image
        (docs/vpt.md §7); None without an image."""
        return self.originals[PERCEIVED_IMAGE] if self.originals else None

    @property
    def first(self):
        """That image made ready: the one the clip branch re-encodes; None without an image."""
        return self.images[PERCEIVED_IMAGE] if self.images else None

    @property
    def user(self) -> str:
        """The last user turn's content."""
        return self.turns[-1][1]


PERCEIVED_IMAGE = 0  # the index, among a request's images, of the one its perceptions look at


def _load_images(bundle, images: list, prepared: bool) -> tuple[tuple, tuple]:
    """(originals, made-ready images) of a request's images; an error names the image (by its
    index) when there are several. prepared: PixelImages are taken as they are."""
    originals, ready = [], []
    for k, image in enumerate(images):
        try:
            if image is None:
                raise TypeError("an image is None (leave a text-only request's image out instead)")
            if isinstance(image, PixelImage):
                if not prepared:
                    raise TypeError("a PixelImage (patch rows) goes with a TokenPrompt, whose ids hold its image pads")
                originals.append(image.picture)
                ready.append(image)
                continue
            originals.append(load_image(image))
            ready.append(bundle.processor.prepare(originals[-1]))
        except (OSError, ValueError, TypeError) as e:
            if len(images) == 1:
                raise
            raise type(e)(f"image {k}: {e}") from None
    return tuple(originals), tuple(ready)


def first_turn(bundle, image, prompt, specials: re.Pattern) -> FirstTurn:
    """Load and check one request's images and prompt (a str or a Conversation) and encode its
    round-1 prompt. image: None (a text-only request), one image, or a list of images, which
    go where the conversation's `<image>` placeholders stand, in order (one placeholder per
    image), or without placeholders all open the first user turn.

    Raises TypeError / ValueError / OSError with a message naming what is wrong (and which
    image, when there are several); the image-pad count of each image's run is always that
    image's own token count."""
    if isinstance(prompt, TokenPrompt):
        return _token_turn(bundle, image, prompt)
    chat = as_conversation(prompt)
    single = isinstance(prompt, str)
    for i, (_, text) in enumerate(chat.turns):
        try:
            check_user_text(text, specials)
        except (TypeError, ValueError) as e:
            raise type(e)(str(e) if single else f"turn {i}: {e}") from None
    try:
        check_user_text(chat.system, specials)
    except ValueError as e:
        raise ValueError(f"the system prompt: {e}") from None
    images = image_list(image)
    count = sum(text.count(IMAGE_PLACEHOLDER) for _, text in chat.turns)
    wrong = [i for i, (role, text) in enumerate(chat.turns) if IMAGE_PLACEHOLDER in text and role != "user"]
    if wrong:
        raise ValueError(f"turn {wrong[0]} is the assistant's: an image goes in a user turn")
    if count and not images:
        raise ValueError(f"the prompt places an image with {IMAGE_PLACEHOLDER!r} but no image was given")
    if count and count != len(images):
        raise ValueError(f"the prompt places {count} image(s) with {IMAGE_PLACEHOLDER!r} but {len(images)} image(s) "
                         f"were given: one {IMAGE_PLACEHOLDER!r} per image, or none (the images then open the first "
                         f"user turn)")
    originals, ready = _load_images(bundle, images, prepared=False)
    counts = [bundle.processor.token_count(im) for im in ready]
    spans = [vision_span(spec.IMAGE_PAD, n) for n in counts]
    first_user = next(i for i, (role, _) in enumerate(chat.turns) if role == "user")
    turns, at = [], 0
    for i, (role, text) in enumerate(chat.turns):
        # the images this turn shows: one per placeholder, or all of them in the first user turn
        n = text.count(IMAGE_PLACEHOLDER) if count else len(spans) if i == first_user else 0
        if n:
            text = user_content(text, *spans[at : at + n])
            at += n
        turns.append((role, text))
    ids = encode(bundle.tokenizer, conversation(turns, chat.system))
    got = ids.count(bundle.vocab.image_pad)
    if got != sum(counts):
        raise ValueError(f"the prompt encodes to {got} image pad tokens where the images have {sum(counts)}")
    return FirstTurn(originals, ready, tuple(turns), chat.system, ids)


def _token_turn(bundle, image, prompt: TokenPrompt) -> FirstTurn:
    ids = list(prompt.ids)
    vocab_size = bundle.model.config.text_config.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"the prompt holds token ids {bad[:5]} outside [0, {vocab_size})")
    pad = bundle.vocab.image_pad
    found = runs(ids, pad)
    images = image_list(image)
    if len(found) != len(images):
        raise ValueError(f"the prompt holds {len(found)} image pad run(s) ({sum(n for _, n in found)} tokens) but "
                         f"{len(images)} image(s) were given: one run per image")
    originals, ready = _load_images(bundle, images, prepared=True)
    for k, ((_, n), im) in enumerate(zip(found, ready)):
        want = bundle.processor.token_count(im)
        if n != want:
            which = f"image {k}" if len(ready) > 1 else "the image"
            raise ValueError(f"the prompt holds {n} image pad tokens where {which} has {want}")
    parsed = parse_conversation(bundle.tokenizer, ids)
    system, turns = parsed if parsed is not None else (spec.SYSTEM_PROMPT, None)
    return FirstTurn(originals, ready, turns, system, ids)

