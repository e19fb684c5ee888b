"""The end of a round: finish the request, or splice its next perception into its sequence.

When a round ends, its output is parsed (docs/vpt.md §7) and the conversation the two-round
reference would read next is built. The request keeps the longest common prefix of what
it holds with that conversation and rolls back the rest (nothing, when the round wrote
exactly what round 2 re-reads; the blocks past the cut go back to the free list); the new
segment (the crop or re-encoded image and the template around it) is appended with its
positions, pending until the next prefill runs it (docs/vpt.md §9).
"""

from __future__ import annotations

from .. import spec
from ..checkpoint import VPTBundle
from ..ops import mrope_positions
from ..perception import plan_perception, unsupported_message
from ..prompt import PERCEIVED_IMAGE, body_of, conversation, encode, runs
from .cache import PagedKVCache, SequenceBound
from .prefix_cache import branch_key, image_key
from .state import PendingReencode, PendingTrace, Request, back_out_of_runs, longest_common_prefix


class Splicer:
    def __init__(self, bundle: VPTBundle, cache: PagedKVCache, bound: SequenceBound, shrink, settings: bytes):
        """bound: the most tokens a sequence may hold; shrink(r, length): give back r's blocks
        past its first `length` tokens (the engine owns the blocks); settings: the engine's
        `prefix_cache.settings_key`, part of the crops' and re-encodings' keys."""
        self.bundle = bundle
        self.settings = settings
        self.cache = cache
        self.bound = bound
        self.shrink = shrink
        self.vocab = bundle.vocab
        self.reencode_pads = {a.pad for a in self.vocab.actions.values()}
        self.run_tokens = {self.vocab.image_pad, *self.reencode_pads}
        self.merge = bundle.model.config.vision_config.spatial_merge_size

    def rollback(self, r: Request, length: int) -> None:
        """Forget r's tokens from `length` on and give back the blocks past them."""
        r.truncate(length)
        self.shrink(r, length)

    def close_round(self, r: Request, reason: str) -> None:
        """End r's round ("stop" or "length"): finish it, or append its next perception segment."""
        ids = r.end_round()
        if r.round >= r.params.max_perception_rounds:
            r.finish(reason)
            return
        body = ids[:-1] if ids and ids[-1] in r.params.stop_token_ids else body_of(ids, self.vocab.im_end)
        perception = spec.parse_perception(body, self.vocab)
        if r.round == 0:
            r.perception = perception
        try:
            plan = plan_perception(self.bundle, perception, r.turn.original, r.turn.first, body)
        except (OSError, ValueError, TypeError) as e:
            r.finish("error", f"request {r.id}: the {perception.kind} perception could not be prepared: {e}")
            return
        if plan is None:
            r.finish(reason)
            return
        if isinstance(plan, str):
            r.finish(plan, unsupported_message(perception.kind, self.bundle.vpt_config) if plan.startswith("unsupported:") else None)
            return
        if r.turns is None:
            r.finish("error", f"request {r.id}: the model asked for a {perception.kind} perception, but its prompt "
                              f"came as token ids that are not a chat conversation, so there is no turn to continue")
            return

        new_ids = encode(self.bundle.tokenizer, conversation(r.turns + plan.turns, r.turn.system))
        keep = back_out_of_runs(new_ids, longest_common_prefix(r.ids, new_ids), self.run_tokens)
        if len(new_ids) > self.bound.tokens:
            r.finish("no_room", f"request {r.id}: the perception segment needs {len(new_ids) - keep} tokens after "
                                f"position {keep} ({len(new_ids)} in all), more than {self.bound}")
            return
        if any(t in self.reencode_pads for t in r.ids[keep:]):  # the model wrote one itself: this request alone ends
            r.finish("error", f"request {r.id}: round {r.round} holds a re-encoding pad token the next round would read "
                              f"again as an image; the request cannot go on")
            return
        rolled = len(r.ids) - keep
        self.rollback(r, keep)
        r.turns += plan.turns
        r.images += plan.images
        if plan.kind == "region":
            r.boxes += plan.boxes
            r.sources += [PERCEIVED_IMAGE] * len(plan.boxes)
            r.image_keys += [image_key(self.settings, r.original_keys[PERCEIVED_IMAGE], box) for box in plan.boxes]
        first_new = len(runs(new_ids, self.vocab.image_pad, 0, keep))
        segment = new_ids[keep:]
        grids = [self.bundle.processor.grid_thw(image) for image in r.images[first_new:]]
        positions, _ = mrope_positions(segment, r.positions.next, grids, image_pad_id=self.vocab.image_pad,
                                       spatial_merge_size=self.merge)
        r.append(segment, positions)
        if plan.reencode is not None:
            kind, model_input = plan.reencode
            r.pending_reencode = PendingReencode(kind, model_input, branch_key(self.settings, kind,
                                                                                     r.original_keys[PERCEIVED_IMAGE]))
        else:
            r.pending_reencode = None
        r.pending_trace = PendingTrace(plan.kind, plan.cells, plan.boxes, len(segment), rolled, r.round_end_time,
                                       PERCEIVED_IMAGE)
        r.round += 1
