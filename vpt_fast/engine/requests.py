"""Requests in and results out: checking, loading and encoding a request before it is queued,
and the result a finished one reports. Neither touches scheduling state, so both may run in any
thread (the async front prepares requests in the threads that submit them)."""

from __future__ import annotations

import secrets

from ..checkpoint import VPTBundle
from ..ops import mrope_positions
from ..prompt import body_of, first_turn, special_token_pattern
from ..sampling import SamplingParams, check_forced
from .cache import SequenceBound
from .prefix_cache import content_key, prompt_image_key
from .state import GenerationResult, Request
from .structured import GrammarBook
from .text import IncrementalText, cut_at_stop


class RequestIntake:
    """Makes checked requests for one engine."""

    def __init__(self, bundle: VPTBundle, bound: SequenceBound, settings: bytes, grammars: GrammarBook):
        """settings: the engine's `prefix_cache.settings_key`, part of every image's key;
        grammars: what compiles structured-output specs."""
        self.bundle = bundle
        self.grammars = grammars
        self.bound = bound
        self.settings = settings
        self.image_pad = bundle.vocab.image_pad
        self.merge = bundle.model.config.vision_config.spatial_merge_size
        self.vocab_size = bundle.model.config.text_config.vocab_size
        self.specials = special_token_pattern(bundle.tokenizer)

    def make(self, rid: int, image, prompt, params: SamplingParams | None, forced_tokens,
             name: str | None = None) -> Request:
        """Request `rid`, loaded, encoded and placed (M-RoPE positions), with its sampling seed
        and its images' content keys (with a structured output, its compiled grammar).
        Bad parameters raise TypeError; an unusable image, prompt or forced tokens, a grammar
        that does not compile, or a prompt longer than a sequence may be, give a request
        already finished with its reason."""
        if params is None:
            params = SamplingParams()
        elif not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        name = name or f"request {rid}"
        try:
            forced = check_forced(forced_tokens, self.vocab_size)
            turn = first_turn(self.bundle, image, prompt, self.specials)
            constraint = self.grammars.constraint(params.structured) if params.structured is not None else None
        except (OSError, ValueError, TypeError) as e:
            return Request(rid, params, None, name=name, error=f"{name}: {e}")
        grids = [self.bundle.processor.grid_thw(image) for image in turn.images]
        positions, _ = mrope_positions(turn.ids, 0, grids, image_pad_id=self.image_pad, spatial_merge_size=self.merge)
        r = Request(rid, params, forced, turn, positions, name=name)
        if constraint is not None and not turn.images:
            constraint.openers = None  # no image to look at again: the answer begins at once
        r.constraint = constraint
        if params.stop:
            r.stop_text = IncrementalText(self.bundle.tokenizer)
        r.original_keys = [content_key(original) for original in turn.originals]
        r.image_keys = [prompt_image_key(self.settings, image, key, box)
                        for image, key, box in zip(turn.images, r.original_keys, r.boxes)]
        r.seed = params.seed if params.seed is not None else secrets.randbits(63)
        if len(r.ids) > self.bound.tokens:
            r.finish("length", f"{name}: the prompt has {len(r.ids)} tokens, more than {self.bound}")
        return r


def result_of(r: Request, tokenizer, eos: int) -> GenerationResult:
    """What a finished request reports."""
    # a round cut short (a full sequence, an abort) has its ids in round_ids still
    round1 = r.round1_ids + (r.round_ids if r.round == 0 else [])
    answer = (r.round_ids or r.answer_ids) if r.round > 0 else []
    shown = answer if r.round > 0 else round1
    text = tokenizer.decode(body_of(shown, eos), skip_special_tokens=True)
    stop_reason = r.stop_reason
    if isinstance(stop_reason, str):
        text, stop_reason = cut_at_stop(text, r.params.stop, r.params.include_stop_str_in_output)
    elif r.finish_reason == "stop" and r.generated and r.generated[-1] in r.params.stop_token_ids \
            and r.generated[-1] != eos:
        stop_reason = r.generated[-1]
    return GenerationResult(token_ids=list(r.generated), round1_ids=list(round1), answer_ids=list(answer), text=text,
                            finish_reason=r.finish_reason or "length", trace=list(r.trace), perception=r.perception,
                            error=r.error, logits=r.logits_log, prompt_tokens=len(r.turn.ids) if r.turn else 0,
                            sequence_ids=r.ids + r.tail if r.turn else [], index=r.index, stop_reason=stop_reason,
                            logprobs=list(r.logprobs_log) if r.logprobs_log is not None else None)
