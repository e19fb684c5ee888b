"""The single-pass VPT engine: perception spliced into the live KV cache.

Round 1 decodes as usual. When it ends, its output is parsed (VPT_SPEC 7) and the
conversation the two-round reference would read next is built; the cache keeps the
longest common prefix with it, rolls back the rest (nothing, when round 1 wrote
exactly what round 2 re-reads) and the new segment (the crop or re-encoded image and
the template around it) is spliced in with its positions. Decoding goes on from
there. Sequences of a batch that need perception in the same step are served
together: one vision-tower call for all crops, one encoder call per branch, one
ragged prefill of all segments. Finished sequences drop out.

The published model runs two inner passes at every step; one suffices here because
attention is causal: a control vector is the final hidden state of the token before
`<|X_action|>`, which the engine already has when it feeds that token.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from .. import spec
from ..checkpoint import VPTBundle, resolve_device, resolve_dtype
from ..ops import mrope_positions
from ..perception import branch_features, plan_perception, project_features, unsupported_message
from ..prompt import body_of, conversation, encode, first_turn, special_token_pattern
from ..sampling import check_batch, check_forced, sample
from .cache import KVCache
from .decode import BUCKETS, DecodeStep
from .state import (GenerationResult, PerceptionTrace, Segment, SequenceState, back_out_of_runs,
                         count_image_runs, longest_common_prefix)
from .runner import Runner


@dataclass
class TokenEvent:
    request: int
    token_id: int
    round: int  # 0 for round 1, k after k perceptions


@dataclass
class PerceptionEvent:
    request: int
    trace: PerceptionTrace


@dataclass
class FinishEvent:
    request: int
    result: GenerationResult


class Engine:
    """Single-pass VPT generation over a loaded bundle (see `vpt_fast.from_pretrained`).

    An engine keeps its KV cache and captured decode graphs between calls; it serves one
    `generate` / `stream` call at a time: calls from several threads take turns, and a
    second call from a thread whose `stream()` is still open raises RuntimeError.
    """

    def __init__(self, bundle: VPTBundle, max_seq_len: int = 4096, max_batch_size: int = 32,
                 cuda_graphs: bool | None = None, image_pipeline: str = "pil"):
        """max_seq_len: cache positions per request; max_batch_size: requests decoded together
        (larger calls run in chunks of this size); cuda_graphs: capture decode steps (default:
        on when the model is on a CUDA device); image_pipeline: "pil" resizes images with PIL
        on the host exactly as the two-round flow does, "device" uploads each original image
        once and makes every crop's patches with `ops.crop_patch_embed` on the model's
        device (within 2/255 of PIL's resampling, so greedy tokens may differ)."""
        if image_pipeline not in ("pil", "device"):
            raise ValueError(f"image_pipeline must be 'pil' or 'device', got {image_pipeline!r}")
        self.image_pipeline = image_pipeline
        if not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise ValueError(f"max_seq_len must be an int >= 2, got {max_seq_len!r}")
        if not isinstance(max_batch_size, int) or not 1 <= max_batch_size <= BUCKETS[-1]:
            raise ValueError(f"max_batch_size must be an int in [1, {BUCKETS[-1]}], got {max_batch_size!r}")
        self.bundle = bundle
        self.runner = Runner(bundle.model)
        try:
            resolve_device(self.runner.device)
            resolve_dtype(self.runner.dtype)
        except ValueError as e:
            raise ValueError(f"the model cannot run here: {e}") from None
        limit = bundle.model.config.text_config.max_position_embeddings
        if max_seq_len > limit:
            raise ValueError(f"max_seq_len {max_seq_len} is above the model's max_position_embeddings {limit}")
        self.max_seq_len = max_seq_len
        self.max_batch_size = max_batch_size
        self.cuda_graphs = self.runner.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._cache: KVCache | None = None
        self._decoder: DecodeStep | None = None
        self.vocab = bundle.vocab
        vcfg = bundle.vpt_config
        self.two_pass = vcfg.two_pass
        self.start_to_action: dict[int, int] = {}
        self.action_ids: set[int] = set()
        for kind in spec.REENCODE_KINDS:
            start, action, _pad = vcfg.ids(kind)
            if action is not None:
                self.action_ids.add(action)
                self.start_to_action[start] = action
        self.reencode_pads = {a.pad: kind for kind, a in self.vocab.actions.items()}
        self._specials = special_token_pattern(bundle.tokenizer)
        self._vocab_size = bundle.model.config.text_config.vocab_size
        self._lock = threading.Lock()
        self._owner: int | None = None  # thread holding the engine for a generate/stream call
        text = bundle.model.config.text_config
        self._cache_shape = (text.num_hidden_layers, text.num_key_value_heads, text.hidden_size // text.num_attention_heads)

    @property
    def device(self) -> torch.device:
        return self.runner.device

    # ------------------------------------------------------------------ public API

    def generate(self, images, prompts, max_new_tokens: int = 64, forced_tokens=None, **kwargs) -> list[GenerationResult]:
        """Answer a batch of requests; one GenerationResult per request, in order.

        Same arguments as `stream`.
        """
        results: list[GenerationResult | None] = [None] * len(prompts)
        for event in self.stream(images, prompts, max_new_tokens, forced_tokens, **kwargs):
            if isinstance(event, FinishEvent):
                results[event.request] = event.result
        return results  # type: ignore[return-value]

    def stream(self, images, prompts, max_new_tokens: int = 64, forced_tokens=None, *, do_sample: bool = False,
               top_k: int | None = None, top_p: float | None = None, seed: int = 0,
               answer_max_new_tokens: int | None = None, max_perception_rounds: int = 1,
               return_logits: bool = False) -> Iterator[TokenEvent | PerceptionEvent | FinishEvent]:
        """Generate, yielding tokens, perceptions and finished requests as they happen.

        images / prompts / forced_tokens as in `reference.two_round_generate`: one image
        (path or PIL) and one prompt (at most one `<image>`) per request; forced_tokens[i]
        scripts the first round-1 tokens of request i. max_new_tokens bounds each round
        (answer_max_new_tokens the rounds after a perception). max_perception_rounds:
        how many perceptions a request may make (1, as the published flow). A request
        whose image or prompt is unusable finishes with reason "error" and its message;
        the others go on.
        """
        answer_max_new_tokens = max_new_tokens if answer_max_new_tokens is None else answer_max_new_tokens
        for name, value in (("max_new_tokens", max_new_tokens), ("answer_max_new_tokens", answer_max_new_tokens),
                            ("max_perception_rounds", max_perception_rounds)):
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "max_perception_rounds" else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'max_perception_rounds' else 'positive'} int, got {value!r}")
        forced = check_batch(images, prompts, forced_tokens)
        with self._one_call():
            generator = torch.Generator(device=self.device).manual_seed(seed)
            torch.manual_seed(seed)
            self._return_logits = return_logits
            self._logits_log: dict[int, list[torch.Tensor]] = {}
            args = (do_sample, top_k, top_p, generator, max_new_tokens, answer_max_new_tokens, max_perception_rounds)
            for first in range(0, len(prompts), self.max_batch_size):
                chunk = range(first, min(first + self.max_batch_size, len(prompts)))
                yield from self._stream_chunk([(i, images[i], prompts[i], forced[i]) for i in chunk], *args)

    @contextmanager
    def _one_call(self):
        """Hold the engine for one generate/stream call: calls from other threads wait their
        turn; a second call from the thread already holding it (a stream() left unfinished)
        is refused, as it could never get its turn."""
        me = threading.get_ident()
        if self._owner == me:
            raise RuntimeError("this engine is already serving a generate/stream call in this thread (a stream() "
                               "not finished or closed yet): finish or close that stream first, or use another Engine")
        with self._lock:
            self._owner = me
            try:
                yield
            finally:
                self._owner = None

    def _slot_cache(self, slots: int) -> KVCache:
        """The engine's cache with room for `slots` sequences (plus the decode scratch slot), kept across calls."""
        if self._cache is None or self._cache.slots < slots + 1:
            layers, kv_heads, head_dim = self._cache_shape
            self._cache = self._decoder = None  # free the old cache and graphs before allocating the larger one
            self._cache = KVCache(layers, slots + 1, self.max_seq_len, kv_heads, head_dim, self.runner.dtype, self.device)
            self._decoder = DecodeStep(self.runner, self._cache, self.cuda_graphs)
        self._cache.lengths.zero_()
        return self._cache

    def _stream_chunk(self, requests, do_sample, top_k, top_p, generator, max_new_tokens, answer_max_new_tokens,
                      max_perception_rounds):
        seqs: list[SequenceState] = []
        for i, image, prompt, forced in requests:
            try:
                forced = check_forced(forced, self._vocab_size)
                turn = first_turn(self.bundle, image, prompt, self._specials)
            except (OSError, ValueError, TypeError) as e:
                yield FinishEvent(i, GenerationResult([], [], [], "", "error", error=f"request {i}: {e}"))
                continue
            seqs.append(SequenceState(i, len(seqs), turn.original, turn.first, turn.user, turn.ids, forced, max_new_tokens,
                                      answer_max_new_tokens))
        if not seqs:
            return
        cache = self._slot_cache(len(seqs))

        fits = []
        for s in seqs:
            if len(s.prompt_ids) > self.max_seq_len:
                s.finish("length")
                s.error = f"the prompt has {len(s.prompt_ids)} tokens, more than max_seq_len {self.max_seq_len}"
                yield FinishEvent(s.index, self._result(s))
            else:
                fits.append((s, Segment(s.prompt_ids, [s.first])))
        if fits:
            self._run_segments(cache, fits)

        while True:
            active = [s for s in seqs if not s.finished]
            if not active:
                break
            tokens = self._choose(active, do_sample, top_k, top_p, generator)
            decode, ended = [], []
            for s, t in zip(active, tokens):
                round_done = t == self.vocab.im_end or len(s.round_ids) + 1 >= s.round_limit
                if not round_done:
                    action = self.start_to_action.get(s.ids[-1])
                    if action is not None:
                        t = action  # the published decode forces <|X_action|> after <|X_action_start|>
                s.round_ids.append(t)
                s.generated.append(t)
                yield TokenEvent(s.index, t, s.round)
                (ended if round_done else decode).append((s, t))

            splices = []
            for s, t in ended:
                reason = "stop" if t == self.vocab.im_end else "length"
                ids = s.end_round()
                if s.round >= max_perception_rounds:
                    s.finish(reason)
                    continue
                body = body_of(ids, self.vocab.im_end)
                perception = spec.parse_perception(body, self.vocab)
                if s.round == 0:
                    s.perception = perception
                try:
                    plan = plan_perception(self.bundle, perception, s.original, s.first, body)
                except (OSError, ValueError, TypeError) as e:
                    s.finish("error")
                    s.error = f"request {s.index}: the {perception.kind} perception could not be prepared: {e}"
                    continue
                if plan is None:
                    s.finish(reason)
                elif isinstance(plan, str):
                    s.finish(plan)
                    if plan.startswith("unsupported:"):
                        s.error = unsupported_message(perception.kind, self.bundle.vpt_config)
                else:
                    splices.append((s, plan))

            steps = []
            for s, t in decode:
                if len(s.ids) >= self.max_seq_len:
                    s.finish("length")
                    s.error = f"the cache slot is full ({self.max_seq_len} tokens)"
                else:
                    steps.append((s, t))
            if steps:
                self._decode(cache, steps)
            if splices:
                for event in self._splice(cache, splices):
                    yield event
            for s in active:
                if s.finished:
                    yield FinishEvent(s.index, self._result(s))

    # ------------------------------------------------------------------ steps

    def _choose(self, active: list[SequenceState], do_sample, top_k, top_p, generator) -> list[int]:
        scores = torch.stack([s.logits for s in active])
        if self._return_logits:
            for s, row in zip(active, scores):
                self._logits_log.setdefault(s.index, []).append(row.detach().to("cpu", copy=True))
        for i, s in enumerate(active):
            step = len(s.round_ids)
            if s.round == 0 and s.forced is not None and step < len(s.forced):
                row = torch.full_like(scores[i], float("-inf"))
                row[s.forced[step]] = 0.0
                scores[i] = row
        return sample(scores, do_sample, top_k, top_p, generator).tolist()

    def _decode(self, cache: KVCache, steps: list[tuple[SequenceState, int]]) -> None:
        """One new token for each of several sequences (a captured graph on CUDA)."""
        overrides = []
        for s, t in steps:
            if self.two_pass and t in self.action_ids:
                s.control = self._hidden_before(s, len(s.ids))
                overrides.append(s.control)
            else:
                overrides.append(None)
        positions = [s.next_position for s, _ in steps]
        logits, hidden = self._decoder([t for _, t in steps], overrides, positions, [s.slot for s, _ in steps])
        for b, (s, t) in enumerate(steps):
            s.appended([t], torch.full((3, 1), positions[b]))
            s.logits = logits[b]
            s.last_hidden = (len(s.ids) - 1, hidden[b])

    @staticmethod
    def _hidden_before(s: SequenceState, index: int) -> torch.Tensor:
        """Final hidden state of the token at index - 1: the control vector of an action at `index`."""
        if s.last_hidden is None or s.last_hidden[0] != index - 1:
            raise RuntimeError(f"request {s.index}: no hidden state for the token before position {index}")
        return s.last_hidden[1]

    def _splice(self, cache: KVCache, splices) -> Iterator[PerceptionEvent]:
        tok = self.bundle.tokenizer
        items = []
        run_tokens = {self.vocab.image_pad, *self.reencode_pads}
        for s, plan in splices:
            new_ids = encode(tok, conversation(s.turns + plan.turns))
            keep = back_out_of_runs(new_ids, longest_common_prefix(s.ids, new_ids), run_tokens)
            if len(new_ids) > self.max_seq_len:
                s.finish("no_room")
                s.error = f"the perception segment needs {len(new_ids) - keep} tokens after position {keep}; the slot holds {self.max_seq_len}"
                continue
            images = s.images + plan.images
            boxes = s.boxes + (plan.boxes if plan.kind == "region" else [])
            first_new_image = count_image_runs(new_ids[:keep], self.vocab.image_pad)
            if any(t in self.reencode_pads for t in s.ids[keep:]):
                raise RuntimeError(f"request {s.index}: a rollback reached an earlier re-encoded image")
            rolled = len(s.ids) - keep
            cache.rollback(s.slot, keep)
            s.rolled_back(keep)
            s.turns += plan.turns
            s.images = images
            s.boxes = boxes
            s.features += [None] * len(plan.images)
            seg = Segment(new_ids[keep:], images[first_new_image:], plan.reencode, first_new_image)
            items.append((s, seg, plan, rolled))
        if not items:
            return
        self._encode_reencodes([(s, seg) for s, seg, _, _ in items])
        self._run_segments(cache, [(s, seg) for s, seg, _, _ in items])
        now = time.perf_counter()
        for s, seg, plan, rolled in items:
            s.round += 1
            trace = PerceptionTrace(plan.kind, plan.cells, plan.boxes, len(seg.ids), rolled, now - s.round_end_time)
            s.trace.append(trace)
            yield PerceptionEvent(s.index, trace)

    def _encode_reencodes(self, items: list[tuple[SequenceState, Segment]]) -> None:
        """Encoder features of every re-encoding request of this step: one call per branch."""
        by_kind: dict[str, list[tuple[SequenceState, Segment]]] = {}
        for s, seg in items:
            if seg.reencode is not None:
                by_kind.setdefault(seg.reencode[0], []).append((s, seg))
        for kind, group in by_kind.items():
            if kind == "clip":
                for s, seg in group:  # the clip branch re-encodes the first image: reuse its features
                    seg.reencode = ("clip", s.features[0])
                continue
            pixels = torch.cat([seg.reencode[1] for _, seg in group]).to(self.device, self.runner.dtype)
            feats = branch_features(self.bundle, kind, pixels)
            for j, (_, seg) in enumerate(group):
                seg.reencode = (kind, feats[j : j + 1])

    def _vision(self, items: list[tuple[SequenceState, Segment]]) -> dict[int, list[tuple[torch.Tensor, list[int]]]]:
        """(features, grid_thw) of every image of these segments, per segment: one tower call for all."""
        images, owners = [], []
        for k, (s, seg) in enumerate(items):
            images += seg.images
            owners += [k] * len(seg.images)
        out: dict[int, list[tuple[torch.Tensor, list[int]]]] = {k: [] for k in range(len(items))}
        if not images:
            return out
        model = self.bundle.model
        if self.image_pipeline == "device":
            pixels, grid = self._device_pixels(items)
        else:
            pixels, grid = self.bundle.processor.qwen_inputs(images)
        with torch.no_grad():
            feats = model.model.visual(pixels.to(self.device, self.runner.dtype), grid_thw=grid.to(self.device)).pooler_output
        sizes = (grid.prod(-1) // model.config.vision_config.spatial_merge_size**2).tolist()
        for k, f, g in zip(owners, torch.split(feats, sizes), grid.tolist()):
            out[k].append((f, g))
        return out

    def _device_pixels(self, items: list[tuple[SequenceState, Segment]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch rows of the segments' images made on the device from each original image."""
        import numpy as np

        from ..ops import crop_patch_embed
        from ..preprocess import smart_resize, to_rgb

        q = self.bundle.processor.qwen
        rows, grids = [], []
        for s, seg in items:
            if s.device_image is None:
                s.device_image = torch.from_numpy(np.array(to_rgb(s.original))).to(self.device).contiguous()
            for j, capped in enumerate(seg.images):
                box = s.boxes[seg.first_image + j]
                out_hw = smart_resize(capped.height, capped.width, q.factor, q.min_pixels, q.max_pixels)
                rows.append(crop_patch_embed(s.device_image, box, out_hw, mean=q.image_mean, std=q.image_std,
                                             max_side=self.bundle.processor.max_side, patch_size=q.patch_size,
                                             merge_size=q.merge_size, temporal_patch_size=q.temporal_patch_size))
                grids.append([1, out_hw[0] // q.patch_size, out_hw[1] // q.patch_size])
        return torch.cat(rows), torch.tensor(grids)

    def _run_segments(self, cache: KVCache, items: list[tuple[SequenceState, Segment]]) -> None:
        """Append segments to their sequences: embeddings, positions, and a ragged prefill.

        A segment is cut before each action token: the action's input embedding is the
        final hidden state of the token before it, known once the previous piece has run.
        """
        vision = self._vision(items)
        plans = []
        for k, (s, seg) in enumerate(items):
            ids = torch.tensor(seg.ids, device=self.device)
            embeds = self.runner.embed(ids)
            feats_grids = vision[k]
            for j, (f, _) in enumerate(feats_grids):
                s.features[seg.first_image + j] = f
            if feats_grids:
                img = ids == self.vocab.image_pad
                embeds[img] = torch.cat([f for f, _ in feats_grids]).to(embeds.dtype)
            positions, _ = mrope_positions(seg.ids, s.next_position, [g for _, g in feats_grids],
                                           image_pad_id=self.vocab.image_pad,
                                           spatial_merge_size=self.bundle.model.config.vision_config.spatial_merge_size)
            cuts = [j for j, t in enumerate(seg.ids) if t in self.action_ids] if self.two_pass else []
            bounds = sorted({0, *cuts, len(seg.ids)})
            pieces = list(zip(bounds[:-1], bounds[1:]))
            plans.append({"s": s, "seg": seg, "embeds": embeds, "positions": positions.to(self.device), "pieces": pieces})
        rounds = max(len(p["pieces"]) for p in plans)
        for r in range(rounds):
            batch = [p for p in plans if r < len(p["pieces"])]
            for p in batch:
                a, z = p["pieces"][r]
                s, seg = p["s"], p["seg"]
                if self.two_pass and seg.ids[a] in self.action_ids:
                    s.control = self._hidden_before(s, len(s.ids))
                    p["embeds"][a] = s.control
                if seg.reencode is not None:
                    kind, feats = seg.reencode
                    pad = self.vocab.actions[kind].pad
                    where = [j for j in range(a, z) if seg.ids[j] == pad]
                    if where:
                        control = s.control if self.two_pass else None
                        if self.two_pass and control is None:
                            raise RuntimeError(f"request {s.index}: re-encoding pads with no action token before them")
                        p["embeds"][where] = project_features(self.bundle, kind, feats, control).to(p["embeds"].dtype)
            T = max(z - a for a, z in (p["pieces"][r] for p in batch))
            H = self.runner.hidden_size
            embeds = torch.zeros(len(batch), T, H, dtype=self.runner.dtype, device=self.device)
            positions = torch.zeros(3, len(batch), T, dtype=torch.long, device=self.device)
            lens = []
            for b, p in enumerate(batch):
                a, z = p["pieces"][r]
                embeds[b, : z - a] = p["embeds"][a:z]
                positions[:, b, : z - a] = p["positions"][:, a:z]
                lens.append(z - a)
            slots = torch.tensor([p["s"].slot for p in batch], device=self.device)
            new_lens = torch.tensor(lens, device=self.device)
            hidden = self.runner.forward(embeds, positions, cache, slots, new_lens)
            last = hidden[torch.arange(len(batch), device=self.device), new_lens - 1]
            for b, p in enumerate(batch):
                a, z = p["pieces"][r]
                s = p["s"]
                s.appended(p["seg"].ids[a:z], p["positions"][:, a:z].cpu())
                s.last_hidden = (len(s.ids) - 1, last[b])
                if r == len(p["pieces"]) - 1:
                    s.logits = self.runner.logits(last[b])

    # ------------------------------------------------------------------ results

    def _result(self, s: SequenceState) -> GenerationResult:
        tok, eos = self.bundle.tokenizer, self.vocab.im_end
        # a round cut short (a full cache slot) has its ids in round_ids still
        round1 = s.round1_ids + (s.round_ids if s.round == 0 else [])
        answer = (s.round_ids or s.answer_ids) if s.round > 0 else []
        shown = answer if s.round > 0 else round1
        text = tok.decode(body_of(shown, eos), skip_special_tokens=True)
        logits = self._logits_log.get(s.index) if self._return_logits else None
        return GenerationResult(token_ids=list(s.generated), round1_ids=list(round1), answer_ids=list(answer), text=text,
                                finish_reason=s.finish_reason or "length", trace=list(s.trace), perception=s.perception,
                                error=s.error, logits=logits)
