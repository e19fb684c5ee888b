"""The two-round VPT pipeline, faithful and slow: ground truth and baseline.

This reproduces the published evaluation flow (docs/vpt.md §5-8) on transformers 5
modules: round 1 generates until `<|im_end|>`; its output is parsed; round 2 re-reads
the whole conversation with the crop / re-encoded image and generates the answer.
It keeps the published model's decode-time behaviour too: two inner LM passes at
every step (each on a deep copy of the KV cache), the token after
`<|X_action_start|>` forced to `<|X_action|>`, and the [start, action] pair
recomputed with the action embedding replaced by the control vector. Requests are
batched with left padding, as the published evaluation does.

Where the published code misbehaves on inputs it never met, this module does the
evident intended thing and says so in the docstring concerned.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _hf_compat, spec
from .checkpoint import VPTBundle
from .perception import branch_features, plan_perception, project_features
from .prompt import body_of, conversation, cut_at_eos, encode, first_turn, special_token_pattern
from .sampling import check_batch, check_forced, sample

# ----------------------------------------------------------------------------- results


@dataclass
class ReferenceResult:
    """One request's outcome; ids are plain lists of ints."""

    round1_prompt_ids: list[int]
    round1_ids: list[int]
    round2_prompt_ids: list[int] | None
    answer_ids: list[int]
    text: str
    perception: Any  # a spec.PerceptionResult
    finish_reason: str  # "stop", "length", or why perception could not run
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    error: str | None = None
    round1_logits: list[torch.Tensor] | None = None  # per generated step, (vocab,) float32
    answer_logits: list[torch.Tensor] | None = None


@dataclass
class _Row:
    """One sequence of a batched generation."""

    ids: list[int]
    images: list[Any] = field(default_factory=list)  # PIL images already capped, for <|image_pad|> runs
    reencode: tuple[str, Any] | None = None  # (kind, model input) for the re-encoding pad run
    forced: list[int] | None = None


# ----------------------------------------------------------------------------- the VPT model step


class _VPTStepper:
    """Forward passes of the published VPT model class, on transformers 5 modules."""

    def __init__(self, bundle: VPTBundle):
        self.b = bundle
        self.model = bundle.model
        self.lm = _hf_compat.text_model(bundle.model)
        self.vcfg = bundle.vpt_config
        self.cfg = bundle.model.config
        self.device = self.lm.embed_tokens.weight.device
        self.dtype = self.lm.embed_tokens.weight.dtype
        # action token id -> kind, for the kinds this checkpoint configures
        self.action_kind = {}
        self.start_to_action = {}
        for kind in spec.REENCODE_KINDS:
            start, action, _pad = self.vcfg.ids(kind)
            if action is not None:
                self.action_kind[action] = kind
                self.start_to_action[start] = action

    def vision_features(self, images: list, processor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Qwen2-VL vision tower over capped PIL images -> (one (N_i, H) tensor per image, grid_thw)."""
        pixels, grid = processor.qwen_inputs(images)
        out = _hf_compat.vision_features(self.model, pixels.to(self.device, self.dtype), grid.to(self.device))
        sizes = (grid.prod(-1) // self.cfg.vision_config.spatial_merge_size**2).tolist()
        return list(torch.split(out, sizes)), grid

    def reencode_features(self, kind: str, model_input) -> torch.Tensor:
        if kind == "clip":
            return self.vision_features([model_input], self.b.processor)[0][0]
        return branch_features(self.b, kind, model_input.to(self.device, self.dtype))

    def lm_pass(self, embeds, attention_mask, position_ids, cache):
        return _hf_compat.text_forward(self.lm, embeds, attention_mask, position_ids, cache)

    def forward(self, window_ids, embeds, reencode_rows, attention_mask, position_ids, cache, controls):
        """One step of the VPT forward (docs/vpt.md §5) over a window of new tokens.

        window_ids (B, L); embeds (B, L, H) with image features already placed;
        reencode_rows: {row: (kind, features, pad positions)} for rows whose re-encoding
        pads are in this window; controls: per-row control vectors remembered from
        earlier steps (an action token recomputed later keeps its control vector).
        Returns (final hidden states of the kept pass, updated cache).
        """
        if not self.vcfg.two_pass:
            embeds = embeds.clone()
            for row, (kind, feats, where) in reencode_rows.items():
                embeds[row, where] = project_features(self.b, kind, feats, None)
            new_cache = copy.deepcopy(cache)
            return self.lm_pass(embeds, attention_mask, position_ids, new_cache), new_cache

        first = embeds.clone()
        for row, (kind, feats, where) in reencode_rows.items():
            first[row, where] = project_features(self.b, kind, feats, None).to(first.dtype)
        hidden1 = self.lm_pass(first, attention_mask, position_ids, copy.deepcopy(cache))

        second = embeds.clone()
        for row in range(window_ids.shape[0]):
            for j in range(window_ids.shape[1]):
                if int(window_ids[row, j]) in self.action_kind:
                    if j > 0:
                        controls[row] = hidden1[row, j - 1].clone()
                    if row not in controls:
                        raise RuntimeError(f"row {row}: an action token with no control vector")
                    second[row, j] = controls[row]
        for row, (kind, feats, where) in reencode_rows.items():
            if row not in controls:
                raise RuntimeError(f"row {row}: re-encoding pads without an action token before them")
            second[row, where] = project_features(self.b, kind, feats, controls[row]).to(second.dtype)
        new_cache = copy.deepcopy(cache)
        return self.lm_pass(second, attention_mask, position_ids, new_cache), new_cache


def _mrope_positions(model, ids: torch.Tensor, mask: torch.Tensor, image_token_id: int, grids) -> torch.Tensor:
    """(3, B, L) prefill positions from stock `get_rope_index` (re-encoding pads are text)."""
    mm = (ids == image_token_id).int()
    if grids is None:
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return pos[None].expand(3, -1, -1).clone()
    return _hf_compat.rope_index(model, ids, mm, grids, mask)


@torch.no_grad()
def _generate(bundle: VPTBundle, rows: list[_Row], max_new_tokens: int, do_sample: bool, top_k, top_p, generator,
              return_logits: bool):
    """Batched generation with the published model's decode rules. -> per row (new ids, logits, finish)."""
    st = _VPTStepper(bundle)
    vocab = bundle.vocab
    pad_id, eos_id = vocab.pad, vocab.im_end
    B = len(rows)
    L = max(len(r.ids) for r in rows)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r.ids):] = torch.tensor(r.ids)
        mask[i, L - len(r.ids):] = 1
    ids, mask = ids.to(st.device), mask.to(st.device)

    # prefill embeddings: token embeddings, image features at <|image_pad|>, re-encoding features
    embeds = st.lm.embed_tokens(ids)
    all_images = [im for r in rows for im in r.images]
    grids = None
    if all_images:
        feats, grids = st.vision_features(all_images, bundle.processor)
        grids = grids.to(st.device)
        img_mask = ids == vocab.image_pad
        flat = torch.cat(feats).to(embeds.dtype)
        if int(img_mask.sum()) != flat.shape[0]:
            raise RuntimeError(f"{int(img_mask.sum())} image pad tokens for {flat.shape[0]} image features")
        embeds[img_mask] = flat
    reencode_rows = {}
    for i, r in enumerate(rows):
        if r.reencode is not None:
            kind, model_input = r.reencode
            pad = vocab.actions[kind].pad
            where = (ids[i] == pad).nonzero()[:, 0]
            reencode_rows[i] = (kind, st.reencode_features(kind, model_input), where)
    positions = _mrope_positions(bundle.model, ids, mask, vocab.image_pad, grids)

    cache = _hf_compat.dynamic_cache(bundle.model.config.text_config)
    controls: dict[int, torch.Tensor] = {}
    hidden, cache = st.forward(ids, embeds, reencode_rows, mask, positions, cache, controls)
    logits = bundle.model.lm_head(hidden[:, -1]).float()
    next_pos = positions.max(dim=0).values.max(dim=-1).values + 1  # (B,)

    unfinished = torch.ones(B, dtype=torch.bool, device=st.device)
    new_ids: list[list[int]] = [[] for _ in range(B)]
    step_logits: list[list[torch.Tensor]] = [[] for _ in range(B)]
    finish = ["length"] * B
    for step in range(max_new_tokens):
        scores = logits.clone()
        for i, r in enumerate(rows):
            if r.forced is not None and step < len(r.forced):
                forced = torch.full_like(scores[i], float("-inf"))
                forced[r.forced[step]] = 0.0
                scores[i] = forced
        token = sample(scores, do_sample, top_k, top_p, generator)
        token = torch.where(unfinished, token, torch.full_like(token, pad_id))
        for i in range(B):
            if unfinished[i]:
                new_ids[i].append(int(token[i]))
                if return_logits:
                    step_logits[i].append(logits[i].cpu())
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = torch.cat([positions, next_pos[None, :, None].expand(3, -1, 1)], dim=2)
        next_pos = next_pos + 1
        done_now = unfinished & (token == eos_id)
        for i in done_now.nonzero()[:, 0].tolist():
            finish[i] = "stop"
        unfinished = unfinished & ~done_now
        if not bool(unfinished.any()) or step == max_new_tokens - 1:
            break

        # the published prepare_inputs_for_generation: force <|X_action|> after <|X_action_start|>,
        # then recompute [start, action] when an action token was just appended
        for i in range(B):
            action = st.start_to_action.get(int(ids[i, -2]))
            if action is not None and unfinished[i] and int(ids[i, -1]) != action:
                ids[i, -1] = action
                new_ids[i][-1] = action
        recompute = any(int(ids[i, -1]) in st.action_kind for i in range(B))
        width = 2 if recompute else 1
        if recompute:
            _hf_compat.crop_cache(cache, -1)
        window = ids[:, -width:]
        hidden, cache = st.forward(window, st.lm.embed_tokens(window), {}, mask, positions[:, :, -width:], cache, controls)
        logits = bundle.model.lm_head(hidden[:, -1]).float()

    return new_ids, (step_logits if return_logits else None), finish


# ----------------------------------------------------------------------------- the two rounds


def two_round_generate(bundle: VPTBundle, images, prompts, max_new_tokens: int = 64, forced_tokens=None,
                       do_sample: bool = False, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                       return_logits: bool = False, answer_max_new_tokens: int | None = None) -> list[ReferenceResult]:
    """Run the published two-round VPT evaluation flow on a batch of requests.

    images: per request None, one path or PIL image, or a list of them; prompts: the user's
    text (or a Conversation) with one `<image>` placeholder per image (without any, the
    images open the first user turn). A perception looks at the conversation's first image
    (docs/vpt.md §7);
    forced_tokens[i]: token ids request i must generate first in round 1 (None: free).
    Greedy by default; with do_sample, top-k / top-p sampling seeded by `seed`.
    max_new_tokens bounds each round; answer_max_new_tokens, when given, bounds round 2.
    return_logits keeps every step's raw logits (round1_logits / answer_logits).
    """
    answer_max_new_tokens = max_new_tokens if answer_max_new_tokens is None else answer_max_new_tokens
    for name, value in (("max_new_tokens", max_new_tokens), ("answer_max_new_tokens", answer_max_new_tokens)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    forced = check_batch(images, prompts, forced_tokens)
    tok, vocab = bundle.tokenizer, bundle.vocab
    generator = torch.Generator(device=bundle.model.lm_head.weight.device).manual_seed(seed)
    torch.manual_seed(seed)

    specials = special_token_pattern(tok)
    vocab_size = bundle.model.config.text_config.vocab_size
    starts = []
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        try:
            forced[i] = check_forced(forced[i], vocab_size)
            starts.append(first_turn(bundle, image, prompt, specials))
        except (OSError, ValueError, TypeError) as e:
            raise type(e)(f"request {i}: {e}") from e
    r1_rows = [_Row(ids=t.ids, images=list(t.images), forced=f) for t, f in zip(starts, forced)]
    r1_new, r1_logits, r1_finish = _generate(bundle, r1_rows, max_new_tokens, do_sample, top_k, top_p, generator, return_logits)

    results: list[ReferenceResult] = []
    r2_rows: list[_Row] = []
    r2_index: list[int] = []
    for i, new in enumerate(r1_new):
        round1 = cut_at_eos(new, vocab.im_end)
        body = body_of(round1, vocab.im_end)
        perception = spec.parse_perception(body, vocab)
        res = ReferenceResult(round1_prompt_ids=r1_rows[i].ids, round1_ids=round1, round2_prompt_ids=None, answer_ids=[],
                              text=tok.decode(body, skip_special_tokens=True), perception=perception,
                              finish_reason=r1_finish[i], round1_logits=r1_logits[i] if r1_logits else None)
        results.append(res)
        try:
            plan = plan_perception(bundle, perception, starts[i].original, starts[i].first, body)
        except ValueError as e:  # a text-only request asking to look again
            res.finish_reason, res.error = "error", f"request {i}: the {perception.kind} perception could not be prepared: {e}"
            continue
        if isinstance(plan, str):
            res.finish_reason = plan
        elif plan is not None:
            res.boxes = plan.boxes if plan.kind == "region" else []
            turns = [*starts[i].turns, *plan.turns]
            r2_rows.append(_Row(ids=encode(tok, conversation(turns, starts[i].system)),
                                images=[*starts[i].images, *plan.images], reencode=plan.reencode))
            r2_index.append(i)

    if r2_rows:
        r2_new, r2_logits, r2_finish = _generate(bundle, r2_rows, answer_max_new_tokens, do_sample, top_k, top_p, generator, return_logits)
        for j, i in enumerate(r2_index):
            res = results[i]
            res.round2_prompt_ids = r2_rows[j].ids
            res.answer_ids = cut_at_eos(r2_new[j], vocab.im_end)
            res.text = tok.decode(body_of(res.answer_ids, vocab.im_end), skip_special_tokens=True)
            res.finish_reason = r2_finish[j]
            res.answer_logits = r2_logits[j] if r2_logits else None
    return results
