"""Automatic prefix caching: a full block of a request's sequence is known by a hash, and a
request that begins with blocks already in the cache takes them instead of computing them.

A block's hash chains the hash of the block before it, the block's token ids, and for every
image whose `<|image_pad|>` run reaches into the block, the image's key and where its run
starts (vLLM's rule). An image's key names its decoded pixels and everything that changes
its encoding: the crop box, the processor's settings, the image pipeline (`image_key`); the
same picture sent as a path, a PIL image or a data URL has one key, two different pictures
of one size have two. Blocks holding a re-encoding (its action token or pad run) and every
block after them get no hash: in a two-pass model their inputs are control vectors, final
hidden states of the sequence itself, which are never shared across requests.

Shared blocks are full and never written again: a request that rolls back into the middle
of a block others also hold gives its hold up and recomputes the kept tokens of that block
into a block of its own (`Engine._shrink`). Free blocks keep their contents and hash until
they are handed out again, least recently released first (`cache.PagedKVCache`).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from PIL import Image

from ..preprocess import PixelImage
from .cache import PagedKVCache

_ROOT = b"vpt_fast prefix cache v1"


def _digest(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


def content_key(image) -> bytes:
    """The key of an image's decoded contents: a PIL image's mode, size, palette and pixels,
    or a `PixelImage`'s patch rows and grid."""
    if isinstance(image, PixelImage):
        rows = image.rows.detach().to("cpu").contiguous().view(-1)
        return _digest(b"rows", str(rows.dtype).encode(), np.asarray(image.grid, np.int64).tobytes(),
                       rows.view(torch.uint8).numpy().tobytes())
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a PixelImage, got {type(image).__name__}")
    palette = image.palette.tobytes() if image.mode == "P" and image.palette is not None else b""
    return _digest(b"pil", image.mode.encode(), np.asarray(image.size, np.int64).tobytes(), palette, image.tobytes())


def settings_key(processor, image_pipeline: str) -> bytes:
    """What besides an image's pixels decides its encoding in one engine: the processor's
    settings and the image pipeline."""
    settings = {"qwen": processor.qwen.to_dict(), "max_side": processor.max_side,
                "sam_max_side": processor.sam_max_side, "pipeline": image_pipeline}
    return _digest(b"settings", json.dumps(settings, sort_keys=True, default=str).encode())


def image_key(settings: bytes, content: bytes, box) -> bytes:
    """The key of the Qwen2-VL image made from an image's `box` (the whole image for an image
    of the prompt, a region for a crop)."""
    return _digest(b"image", settings, content, np.asarray(box, np.int64).tobytes())


def prompt_image_key(settings: bytes, image, content: bytes, box) -> bytes:
    """The key of an image of a request's prompt: made from its original, or given as patch rows."""
    if isinstance(image, PixelImage):
        return _digest(b"image rows", settings, content_key(image))
    return image_key(settings, content, box)


def branch_key(settings: bytes, kind: str, content: bytes) -> bytes:
    """The key of a DINOv2 or SAM encoder's output for an image."""
    return _digest(b"branch", settings, kind.encode(), content)


class PrefixCache:
    """Finds a request's leading blocks in the cache, and makes its full blocks findable as
    they are written. With `enabled` False it finds nothing and publishes nothing."""

    def __init__(self, cache: PagedKVCache, image_pad: int, barrier_tokens: set[int], action_ids: set[int],
                 enabled: bool):
        """barrier_tokens: tokens whose blocks (and all after) are never shared; action_ids:
        tokens whose input embedding is the hidden state of the token before them (a match
        never ends just before one: that hidden state would be missing)."""
        self.cache = cache
        self.bs = cache.block_size
        self.image_pad = image_pad
        self.barrier = frozenset(barrier_tokens)
        self.action_ids = frozenset(action_ids)
        self.enabled = enabled
        self.queries = 0  # tokens looked up
        self.hits = 0  # of those, tokens found
        # hashes of blocks a running request is about to compute (its prompt past what it found),
        # by that request's id: a request that begins with them waits for them (`waits`)
        self._coming: dict[bytes, int] = {}

    def hashes(self, r, upto: int) -> list[bytes | None]:
        """r's block hashes for its first `upto` full blocks (kept on r, extended as needed;
        None for a block that is never shared)."""
        done, bs, ids, pad, starts = r.block_hashes, self.bs, r.ids, self.image_pad, r.run_starts
        while len(done) < upto:
            i = len(done)
            a, b = i * bs, (i + 1) * bs
            prev = done[-1] if done else _ROOT
            block = ids[a:b]
            extra = []
            if pad in block:
                for j in range(a, b):
                    if ids[j] != pad or (j > a and ids[j - 1] == pad):
                        continue
                    if j == 0 or ids[j - 1] != pad:  # a run begins here
                        starts.append(j)
                    # a run reaching into the block: its image (the k-th run) and where it starts; pads
                    # with no image of their own (the model wrote them) make the block unshareable
                    k = len(starts) - 1
                    extra += [r.image_keys[k] if k < len(r.image_keys) else None, starts[-1].to_bytes(8, "little")]
            if prev is None or None in extra or not self.barrier.isdisjoint(block):
                done.append(None)
            else:
                done.append(_digest(prev, np.asarray(block, np.int64).tobytes(), *extra))
            r.block_runs.append(len(starts))
        return done

    def forget_after(self, r, length: int) -> None:
        """Drop r's hashes of blocks that reach past `length` tokens (a rollback)."""
        self.drop(r)
        keep = length // self.bs
        del r.block_hashes[keep:]
        del r.block_runs[keep:]
        del r.run_starts[r.block_runs[-1] if r.block_runs else 0:]
        r.published = min(r.published, keep)

    def match(self, r) -> list[int]:
        """The blocks holding r's leading full blocks, as found now (not yet shared). The last
        token is always left to compute (its logits are needed), and a match does not end
        just before an action token (its input is the hidden state of the token before)."""
        if not self.enabled:
            return []
        most = (len(r.ids) - 1) // self.bs
        found = []
        for h in self.hashes(r, most):
            block = None if h is None else self.cache.find(h)
            if block is None:
                break
            found.append(block)
        while found and r.ids[len(found) * self.bs] in self.action_ids:
            found.pop()
        return found

    def waits(self, r, found: list[int]) -> bool:
        """Whether r should wait for blocks running requests are computing: when the blocks
        after `found` that are coming cover at least half of what r would compute now, r
        waits a step or more and finds them, instead of computing them too (requests with a
        common prefix arriving together: questions about one image in a batch). A short
        common prefix (the system prompt) is not worth a step's wait."""
        if not self.enabled:
            return False
        coming, most = 0, (len(r.ids) - 1) // self.bs
        for h in r.block_hashes[len(found):most]:
            if h is None or self._coming.get(h, r.id) == r.id:
                break
            coming += 1
        return coming > 0 and 2 * coming * self.bs >= len(r.ids) - len(found) * self.bs

    def expect(self, r, found: list[int]) -> None:
        """r was admitted with `found`: the rest of its prompt's full blocks are coming."""
        if not self.enabled:
            return
        for h in self.hashes(r, len(r.ids) // self.bs)[len(found):]:
            if h is None:
                break
            if self._coming.setdefault(h, r.id) == r.id:
                r.coming.append(h)

    def drop(self, r) -> None:
        """r holds no blocks any more: what it was to compute is not coming from it."""
        for h in r.coming:
            if self._coming.get(h) == r.id:
                del self._coming[h]
        r.coming = []

    def forget_requests(self) -> None:
        """Every request is gone (the cache was reset): nothing is coming."""
        self._coming.clear()

    def count(self, r, found: list[int]) -> None:
        """Count an admission's lookup: r's tokens, and the tokens of the blocks it took."""
        if self.enabled:
            self.queries += len(r.ids)
            self.hits += len(found) * self.bs

    def publish(self, r) -> None:
        """Make r's blocks that are full and written findable by their hashes."""
        if not self.enabled:
            return
        full = r.num_cached // self.bs
        if full <= r.published:
            return
        for i, h in enumerate(self.hashes(r, full)[r.published:full], start=r.published):
            if h is None:
                break
            self.cache.publish(r.blocks[i], h)
            if self._coming.get(h) == r.id:
                del self._coming[h]
        r.published = full
