"""A picture of what the model looked at: the image with the 8x8 region grid, the cells a
region block named, the box cropped from them, and a caption with the question, the
perception and the answer.

    from vpt_fast.picture import trace_picture
    trace_picture("street.jpg", result.trace, question, result.text).save("trace.png")
"""

from __future__ import annotations

import textwrap
import unicodedata
from typing import Any, Sequence

from PIL import Image, ImageDraw, ImageFont

from . import spec
from .preprocess import load_image, to_rgb

MIN_SIDE = 384  # small images are enlarged (NEAREST, by a whole factor) so the drawing stays legible
BOX = (230, 30, 30)
CELL = (255, 210, 0, 90)
GRID_LINE = (255, 255, 255, 110)
REENCODE = (40, 120, 255)
CAPTION_BG = (250, 250, 250)
CAPTION_FG = (20, 20, 20)
_BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def readable(text: str) -> str:
    """Text with control, unassigned and bidirectional-override characters written as escapes
    (a newline becomes \\n), so an answer shows exactly what it holds on one line."""
    out = []
    for ch in text:
        category = unicodedata.category(ch)
        if category in ("Cc", "Cs", "Co", "Cn") or ch in _BIDI_CONTROLS:
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


def describe(trace: Any) -> str:
    """One line saying what a perception looked at."""
    if trace.kind == "region":
        parts = []
        for (x0, y0, x1, y1), box in zip(trace.cells, trace.boxes):
            cols = f"x{x0}" if x0 == x1 else f"x{x0}-{x1}"
            rows = f"y{y0}" if y0 == y1 else f"y{y0}-{y1}"
            parts.append(f"cells {cols} {rows} -> box {tuple(box)}")
        return "region: " + "; ".join(parts)
    return f"{trace.kind}: the whole image re-encoded by the {trace.kind} branch"


def trace_picture(image: Any, traces: Sequence[Any], question: str | None = None, answer: str | None = None,
                  finish_reason: str | None = None) -> Image.Image:
    """The original image (path or PIL) with what each perception looked at drawn on it, and a
    caption. traces: `PerceptionTrace`s (anything with kind, cells and boxes)."""
    picture = to_rgb(load_image(image)).copy()
    width, height = picture.size
    scale = max(1, MIN_SIDE // max(width, height))
    if scale > 1:
        picture = picture.resize((width * scale, height * scale), Image.Resampling.NEAREST)
    overlay = Image.new("RGBA", picture.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    line = max(2, min(picture.size) // 150)
    regions = [t for t in traces if t.kind == "region"]
    if regions:
        for i in range(1, spec.GRID):
            x = int(i * width / spec.GRID) * scale
            y = int(i * height / spec.GRID) * scale
            draw.line([(x, 0), (x, picture.height)], fill=GRID_LINE, width=1)
            draw.line([(0, y), (picture.width, y)], fill=GRID_LINE, width=1)
        for t in regions:
            for x0, y0, x1, y1 in t.cells:
                draw.rectangle([int(x0 * width / spec.GRID) * scale, int(y0 * height / spec.GRID) * scale,
                                int((x1 + 1) * width / spec.GRID) * scale - 1, int((y1 + 1) * height / spec.GRID) * scale - 1],
                               fill=CELL)
    picture = Image.alpha_composite(picture.convert("RGBA"), overlay).convert("RGB")
    draw = ImageDraw.Draw(picture)
    for t in traces:
        if t.kind == "region":
            for x0, y0, x1, y1 in t.boxes:
                draw.rectangle([x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1], outline=BOX, width=line)
        else:
            draw.rectangle([0, 0, picture.width - 1, picture.height - 1], outline=REENCODE, width=line)

    lines = []
    if question is not None:
        lines.append("Q: " + _clip(readable(question)))
    lines += ["looked at " + describe(t) for t in traces] or ["looked at nothing more"]
    if answer is not None:
        lines.append("A: " + _clip(readable(answer)) + (f" ({finish_reason})" if finish_reason else ""))
    return _with_caption(picture, lines)


def _clip(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _with_caption(picture: Image.Image, lines: list[str]) -> Image.Image:
    size = max(12, picture.width // 40)
    font = ImageFont.load_default(size=size)
    chars = max(20, int(picture.width / (size * 0.6)))
    wrapped = [w for text in lines for w in textwrap.wrap(text, chars, break_long_words=True) or [""]]
    step = int(size * 1.3)
    band = step * len(wrapped) + size
    out = Image.new("RGB", (picture.width, picture.height + band), CAPTION_BG)
    out.paste(picture, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, text in enumerate(wrapped):
        draw.text((size // 2, picture.height + size // 2 + i * step), text, fill=CAPTION_FG, font=font)
    return out
