"""Images named by URL: `data:` URLs (base64 PNG, JPEG, WebP or GIF) and, where a local folder
is allowed, `file://` URLs inside it. No other scheme: vpt_fast reaches no network. Limits on
bytes and pixels refuse large images (decompression bombs included) before their pixels are
decoded. Used by the server (chat requests) and by dataset evaluation (data: URLs in JSONL)."""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from .preprocess import load_image

SHOWN_URL_CHARS = 120  # how much of a client's URL an error message repeats


def _shown(url: str) -> str:
    """The URL as the client sent it, for a message: repr'd, cut at SHOWN_URL_CHARS."""
    return repr(url if len(url) <= SHOWN_URL_CHARS else url[:SHOWN_URL_CHARS] + "...")


DATA_URL = re.compile(r"data:(?P<mime>[\w/+.-]*)(?P<params>(;[\w=.+-]+)*?);base64,(?P<data>.*)", re.S)
FORMATS = {"PNG", "JPEG", "WEBP", "GIF"}


class MediaError(ValueError):
    """An image URL the server cannot use; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class MediaPolicy:
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 64_000_000
    allowed_local_media_path: str | None = None

    def load(self, url: str) -> Image.Image:
        """The image a URL names, decoded; MediaError (400 or 413) with the reason otherwise."""
        if url.startswith("data:"):
            return self._decode(self._data(url), "the data: URL")
        if url.startswith("file:"):
            return self._file(url)
        scheme = urlparse(url).scheme or "a bare path"
        raise MediaError(f"image URL scheme {scheme!r} is not accepted: send the image as a data: URL (base64)"
                         + (" or a file:// URL under the allowed local media path" if self.allowed_local_media_path else ""))

    def load_each(self, images: list, is_url: Callable[[Any], bool] = lambda image: isinstance(image, str)) -> list:
        """A request's images with each URL among them (what `is_url` picks) loaded by `load`,
        the others left as they are; a MediaError names the image by its index when there are
        several."""
        out = []
        for k, image in enumerate(images):
            try:
                out.append(self.load(image) if is_url(image) else image)
            except MediaError as e:
                if len(images) == 1:
                    raise
                raise MediaError(f"image {k}: {e}", e.status) from None
        return out

    def _data(self, url: str) -> bytes:
        match = DATA_URL.fullmatch(url)
        if match is None:
            raise MediaError("a data: URL must be data:<image type>;base64,<data>")
        mime = match["mime"].lower()
        if mime and not mime.startswith("image/"):
            raise MediaError(f"a data: URL of type {mime!r} is not an image")
        encoded = match["data"]
        if len(encoded) * 3 // 4 > self.max_image_bytes:
            raise MediaError(f"the image is over the limit of {self.max_image_bytes} bytes", 413)
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as e:
            raise MediaError(f"the data: URL is not valid base64 ({e})") from None

    def _file(self, url: str) -> Image.Image:
        """A file:// URL inside the allowed folder. Whatever is wrong with it (missing, outside the
        folder, not a regular file, a NUL, an over-long name, a symlink loop) gets one message
        naming the URL as sent: nothing about what it resolved to or what exists."""
        if self.allowed_local_media_path is None:
            raise MediaError("file:// image URLs are not accepted by this server (see --allowed-local-media-path)")
        shown = _shown(url)
        refused = MediaError(f"the file URL {shown} does not name a file under the allowed local media path")
        try:
            path = Path(unquote(urlparse(url).path, errors="strict"))
            if "\x00" in str(path):
                raise refused
            path = path.resolve(strict=True)
            root = Path(self.allowed_local_media_path).resolve()
            if os.path.commonpath([root, path]) != str(root) or not path.is_file():
                raise refused
            size = path.stat().st_size
            if size > self.max_image_bytes:
                raise MediaError(f"the image is over the limit of {self.max_image_bytes} bytes", 413)
            data = path.read_bytes()
        except (OSError, ValueError, RuntimeError) as e:  # missing, too long, a loop, undecodable %-escapes
            if isinstance(e, MediaError):
                raise
            raise refused from None
        return self._decode(data, f"the image at {shown}")

    def _decode(self, data: bytes, what: str) -> Image.Image:
        if len(data) > self.max_image_bytes:
            raise MediaError(f"the image is over the limit of {self.max_image_bytes} bytes", 413)
        try:
            opened = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise MediaError(f"{what}: refused ({e})", 413) from None
        except (UnidentifiedImageError, OSError):
            raise MediaError(f"{what} is not an image PIL can read (accepted: {', '.join(sorted(FORMATS))})") from None
        if opened.format not in FORMATS:
            raise MediaError(f"{what} is a {opened.format} image; accepted: {', '.join(sorted(FORMATS))}")
        width, height = opened.size
        if width * height > self.max_image_pixels:
            raise MediaError(f"{what} is {width}x{height} pixels, over the limit of {self.max_image_pixels}", 413)
        try:
            opened.load()
        except Image.DecompressionBombError as e:
            raise MediaError(f"{what}: refused ({e})", 413) from None
        except MemoryError:
            raise
        except Exception as e:  # truncated or corrupt data surfaces while decoding
            raise MediaError(f"{what} cannot be decoded ({type(e).__name__}: {e})") from None
        try:
            return load_image(opened)
        except ValueError as e:
            raise MediaError(f"{what}: {e}") from None
