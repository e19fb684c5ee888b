"""Prefill of pending tokens: vision batching, device pixels, and one ragged prefill.

Whatever a request holds that is not yet in the cache (a prompt, a spliced perception
segment, a whole sequence after a preemption) is fed here. All images of all requests
in one call go through one vision-tower call, each re-encoding branch runs once for all
its requests, and the tokens of every request are packed into one ragged prefill. A
request's tokens are cut before each action token whose input embedding is not known
yet: it is the final hidden state of the token before it (docs/vpt.md §5), known once the
piece before has run; the pieces of all requests run in lockstep.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import _hf_compat
from ..checkpoint import VPTBundle
from ..ops import crop_patch_embed
from ..perception import branch_features, project_features
from ..preprocess import PixelImage, smart_resize, to_rgb
from ..prompt import PERCEIVED_IMAGE, runs
from .cache import PagedKVCache
from .encoder_cache import EncoderCache
from .runner import Runner
from .state import Request


class SegmentRunner:
    def __init__(self, bundle: VPTBundle, runner: Runner, cache: PagedKVCache, image_pipeline: str,
                 encoder_cache: EncoderCache):
        self.bundle = bundle
        self.runner = runner
        self.cache = cache
        self.image_pipeline = image_pipeline
        self.encoder_cache = encoder_cache
        self.encoded_images = 0  # images and crops through the vision tower, inputs through a branch encoder
        self.vocab = bundle.vocab
        self.merge = bundle.model.config.vision_config.spatial_merge_size
        self.two_pass = bundle.vpt_config.two_pass
        self.action_ids = set(bundle.vpt_config.start_to_action.values()) if self.two_pass else set()

    @property
    def device(self) -> torch.device:
        return self.runner.device

    # ------------------------------------------------------------------ features

    def _wanted_images(self, r: Request) -> list[tuple[int, int]]:
        """(run start, image index) of r's images whose features are needed and missing: those
        whose runs reach into r's pending tokens (a run may begin in blocks found in the prefix
        cache), and the image a pending clip re-encoding looks at (its features are the clip
        branch's input)."""
        every = runs(r.ids, self.vocab.image_pad)
        wanted = [(start, k) for k, (start, n) in enumerate(every) if start + n > r.num_cached]
        if r.pending_reencode is not None and r.pending_reencode.kind == "clip":
            wanted.insert(0, (every[PERCEIVED_IMAGE][0], PERCEIVED_IMAGE))
        return list(dict.fromkeys((start, k) for start, k in wanted if start not in r.spans))

    def _vision(self, requests: list[Request]) -> None:
        """Features of every wanted image of these requests: from the encoder cache, else with
        one vision-tower call for all (an image wanted twice is encoded once)."""
        todo: dict = {}  # images to encode, by key (by request and run with the cache off)
        for r in requests:
            for start, k in self._wanted_images(r):
                found = self.encoder_cache.get(r.image_keys[k])
                if found is not None:
                    r.spans[start] = found
                else:
                    todo.setdefault(self._same(r.image_keys[k], r, start), []).append((r, start, k))
        if not todo:
            return
        firsts = [group[0] for group in todo.values()]
        if self.image_pipeline == "device" or any(isinstance(r.images[k], PixelImage) for r, _, k in firsts):
            pixels, grid = self._device_pixels([(r, k) for r, _, k in firsts])
        else:
            pixels, grid = self.bundle.processor.qwen_inputs([r.images[k] for r, _, k in firsts])
        feats = _hf_compat.vision_features(self.bundle.model, pixels.to(self.device, self.runner.dtype), grid.to(self.device))
        self.encoded_images += len(firsts)
        sizes = (grid.prod(-1) // self.merge**2).tolist()
        for (key, group), f in zip(todo.items(), torch.split(feats, sizes)):
            f = f.to(self.runner.dtype)
            if self.encoder_cache.budget and len(todo) > 1:  # a view would keep the whole batch's features alive
                f = f.clone()
            self.encoder_cache.put(group[0][0].image_keys[group[0][2]], f)
            for r, start, _ in group:
                r.spans[start] = f

    def _same(self, key: bytes, r: Request, start: int):
        """What groups the images encoded once in a call: their key, or with the encoder cache
        off (nothing reused) each request's own run."""
        return key if self.encoder_cache.budget else (key, r.id, start)

    def _device_pixels(self, wanted: list[tuple[Request, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch rows of images (request, image index) on the device: a `PixelImage`'s own rows;
        otherwise made there from each original image (image_pipeline "device") or on the
        host by the processor ("pil")."""
        q = self.bundle.processor.qwen
        rows, grids = [], []
        for r, k in wanted:
            if isinstance(r.images[k], PixelImage):
                rows.append(r.images[k].rows.to(self.device, torch.float32))
                grids.append(list(r.images[k].grid))
                continue
            if self.image_pipeline != "device":
                pixels, grid = self.bundle.processor.qwen_inputs([r.images[k]])
                rows.append(pixels.to(self.device))
                grids.append(grid[0].tolist())
                continue
            source = r.sources[k]
            if source not in r.device_images:
                original = r.turn.originals[source]
                r.device_images[source] = torch.from_numpy(np.array(to_rgb(original))).to(self.device).contiguous()
            capped = r.images[k]
            out_hw = smart_resize(capped.height, capped.width, q.factor, q.min_pixels, q.max_pixels)
            rows.append(crop_patch_embed(r.device_images[source], r.boxes[k], out_hw, mean=q.image_mean, std=q.image_std,
                                         max_side=self.bundle.processor.max_side, patch_size=q.patch_size,
                                         merge_size=q.merge_size, temporal_patch_size=q.temporal_patch_size))
            grids.append([1, out_hw[0] // q.patch_size, out_hw[1] // q.patch_size])
        return torch.cat(rows), torch.tensor(grids)

    def _reencodes(self, requests: list[Request]) -> dict[int, torch.Tensor]:
        """Encoder features of every pending re-encoding, by request id: one call per branch."""
        out: dict[int, torch.Tensor] = {}
        by_kind: dict[str, list[Request]] = {}
        for r in requests:
            if r.pending_reencode is not None:
                by_kind.setdefault(r.pending_reencode.kind, []).append(r)
        for kind, group in by_kind.items():
            if kind == "clip":  # the clip branch re-encodes the image it looks at: reuse its features
                for r in group:
                    out[r.id] = r.spans[runs(r.ids, self.vocab.image_pad)[PERCEIVED_IMAGE][0]]
                continue
            todo: dict = {}  # requests whose features are still to make, by key
            for r in group:
                if r.pending_reencode.features is None:  # else a chunk before had them made
                    r.pending_reencode.features = self.encoder_cache.get(r.pending_reencode.key)
                if r.pending_reencode.features is None:
                    todo.setdefault(self._same(r.pending_reencode.key, r, 0), []).append(r)
            if todo:
                firsts = [same[0] for same in todo.values()]
                pixels = torch.cat([r.pending_reencode.model_input for r in firsts]).to(self.device, self.runner.dtype)
                feats = branch_features(self.bundle, kind, pixels)
                self.encoded_images += len(firsts)
                for j, same in enumerate(todo.values()):
                    one = feats[j : j + 1]
                    if self.encoder_cache.budget and len(todo) > 1:
                        one = one.clone()
                    self.encoder_cache.put(same[0].pending_reencode.key, one)
                    for r in same:
                        r.pending_reencode.features = one
            for r in group:
                out[r.id] = r.pending_reencode.features
        return out

    # ------------------------------------------------------------------ prefill

    def _pieces(self, r: Request, n: int) -> list[tuple[int, int]]:
        """r's pending tokens up to index n, cut before each action token with no input embedding yet."""
        a = r.num_cached
        cuts = [j for j in range(a, n) if r.ids[j] in self.action_ids and j not in r.spans]
        bounds = sorted({a, *cuts, n})
        return list(zip(bounds[:-1], bounds[1:]))

    def _embeds(self, r: Request, a: int, z: int, encoded: dict[int, torch.Tensor]) -> torch.Tensor:
        """Input embeddings of r's tokens a .. z - 1, settling the control vector and re-encoded
        features that become known at this piece."""
        if self.two_pass and r.ids[a] in self.action_ids and a not in r.spans:
            r.control = r.control_before(a)
            r.spans[a] = r.control[None]
        if r.pending_reencode is not None:
            pad = self.vocab.actions[r.pending_reencode.kind].pad
            for start, _ in runs(r.ids, pad, a, z):
                if self.two_pass and r.control is None:
                    raise RuntimeError(f"request {r.id}: re-encoding pads with no action token before them")
                r.spans[start] = project_features(self.bundle, r.pending_reencode.kind, encoded[r.id],
                                                  r.control if self.two_pass else None).to(self.runner.dtype)
                r.pending_reencode = None
        embeds = self.runner.embed(torch.tensor(r.ids[a:z], device=self.device))
        for start, span in r.spans.items():  # a run may begin before the chunk or end after it
            lo, hi = max(a, start), min(z, start + span.shape[0])
            if lo < hi:
                embeds[lo - a : hi - a] = span[lo - start : hi - start]
        return embeds

    @torch.no_grad()
    def run(self, requests: list[Request], budget: int | None = None) -> dict[int, int]:
        """Feed the pending tokens of these requests (each holds blocks for all its tokens), at
        most `budget` tokens in all (None: no bound), in the order given: a request may get a
        chunk of its tokens, and the rest at a later call (chunked prefill). A request whose
        pending tokens are all in afterwards has its last hidden state and next-token logits.
        Returns the tokens fed, by request id."""
        stops, left = {}, budget
        for r in requests:
            if r.pending and (left is None or left > 0):
                take = r.pending if left is None else min(r.pending, left)
                stops[r.id] = r.num_cached + take
                left = None if left is None else left - take
        requests = [r for r in requests if r.id in stops]
        if not requests:
            return {}
        fed = {r.id: stops[r.id] - r.num_cached for r in requests}
        self._vision(requests)
        encoded = self._reencodes(requests)
        pieces = {r.id: self._pieces(r, stops[r.id]) for r in requests}
        for step in range(max(len(p) for p in pieces.values())):
            batch = [r for r in requests if step < len(pieces[r.id])]
            spans = [pieces[r.id][step] for r in batch]
            embeds = torch.cat([self._embeds(r, a, z, encoded) for r, (a, z) in zip(batch, spans)])
            positions = torch.cat([r.positions.window(a, z) for r, (a, z) in zip(batch, spans)], dim=1)
            slot_mapping = [s for r, (a, z) in zip(batch, spans) for s in self.cache.slots(r.blocks, a, z)]
            width = max(len(r.blocks) for r in batch)
            tables = [r.blocks + [0] * (width - len(r.blocks)) for r in batch]
            counts = [z - a for a, z in spans]
            cu = np.cumsum([0] + counts).tolist()
            to = dict(device=self.device, dtype=torch.long)
            hidden = self.runner.prefill(embeds, positions.to(self.device), self.cache, torch.tensor(slot_mapping, **to),
                                         torch.tensor(tables, **to), torch.tensor([z for _, z in spans], **to),
                                         torch.tensor(cu, **to), max(counts))
            last = hidden[torch.tensor(cu[1:], device=self.device) - 1]
            done = []
            for b, (r, (a, z)) in enumerate(zip(batch, spans)):
                r.num_cached = z
                r.last_hidden = (z - 1, last[b])
                if z == len(r.ids):
                    done.append(b)
            if done:
                logits = self.runner.logits(last[done])
                for row, b in zip(logits, done):
                    batch[b].logits = row
        return fed
