"""What a perception adds to the conversation, and the features of a re-encoding branch.

Shared by the reference pipeline and the engine (docs/vpt.md §4 and §7): `plan_perception`
turns a parsed round-1 output into the next turns and images, `branch_features` runs a
DINOv2 / SAM encoder, `project_features` applies a branch's projector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import spec
from .checkpoint import VPTBundle
from .prompt import action_text, region_prompt, vision_span


@torch.no_grad()
def branch_features(bundle: VPTBundle, kind: str, pixels: torch.Tensor) -> torch.Tensor:
    """DINOv2 patch tokens without CLS (B, 256, D), or SAM image embeddings (B, C, 64, 64)."""
    if kind == "dino":
        return bundle.detection_model(pixel_values=pixels).last_hidden_state[:, 1:]
    return bundle.seg_model(pixel_values=pixels).last_hidden_state


@torch.no_grad()
def project_features(bundle: VPTBundle, kind: str, features: torch.Tensor, control: torch.Tensor | None) -> torch.Tensor:
    """One image's re-encoding features -> (N, H) pad embeddings (docs/vpt.md §4); control (H,) or None."""
    c = None if control is None else control[None]
    if kind == "clip":
        return bundle.clip_projector([features], c)[0]
    projector = bundle.detection_projector if kind == "dino" else bundle.seg_projector
    return projector(features, c)[0]


@dataclass
class PerceptionPlan:
    """What one perception adds to the conversation (docs/vpt.md §7)."""

    kind: str
    turns: list[tuple[str, str]]  # the assistant turn that asked, then the user turn that shows
    images: list[Any]  # capped crops, for the <|image_pad|> runs of the new user turn
    reencode: tuple[str, Any] | None  # (kind, encoder input) for the re-encoding pad run
    boxes: list[tuple[int, int, int, int]]
    cells: list[tuple[int, int, int, int]]


def plan_perception(bundle: VPTBundle, perception, original, first, body_ids: list[int]):
    """The next turns for a parsed output: a PerceptionPlan, None (nothing to look at:
    the output is the answer), or a finish reason when the request cannot go on.

    original: the image the perception looks at, as loaded: the conversation's first image
    (docs/vpt.md §7; None: a text-only request, where a request to look again raises
    ValueError); first: it made ready for the vision tower (the clip branch re-encodes
    exactly that)."""
    tok, proc = bundle.tokenizer, bundle.processor
    if isinstance(perception, spec.Malformed):
        return "malformed"
    if original is None and isinstance(perception, (spec.ReencodeRequest, spec.RegionRequest)):
        raise ValueError("the request has no image to look at again")
    if isinstance(perception, spec.ReencodeRequest):
        kind = perception.kind
        if kind not in bundle.reencode_kinds:
            return f"unsupported:{kind}"
        if kind == "clip":
            model_input, n = first, proc.token_count(first)
        elif kind == "dino":
            model_input, n = proc.dino_inputs([original]), dino_token_count(bundle)
        else:
            model_input, n = proc.sam_inputs([original]), sam_token_count(bundle)
        turns = [("assistant", action_text(kind)), ("user", vision_span(spec.ACTION_TOKENS[kind].pad, n))]
        w, h = original.size
        return PerceptionPlan(kind, turns, [], (kind, model_input), [(0, 0, w, h)], [])
    if isinstance(perception, spec.RegionRequest):
        w, h = original.size
        boxes = [spec.block_box(b, w, h) for b in perception.blocks]
        crops = [proc.prepare_crop(original, box) for box in boxes]
        spans = [vision_span(spec.IMAGE_PAD, proc.token_count(c)) for c in crops]
        turns = [("assistant", tok.decode(body_ids, skip_special_tokens=False)), ("user", region_prompt(len(crops), spans))]
        return PerceptionPlan("region", turns, crops, None, boxes, [b.cells for b in perception.blocks])
    return None


def dino_token_count(bundle: VPTBundle) -> int:
    """Pad tokens of a DINOv2 re-encoding: its patch tokens at 224 pixels."""
    c = bundle.detection_model.config
    return (224 // c.patch_size) ** 2


def sam_token_count(bundle: VPTBundle) -> int:
    """Pad tokens of a SAM re-encoding: the embedding grid after the projector's stride-4 conv."""
    c = bundle.seg_model.config
    return (c.image_size // c.patch_size // 4) ** 2


BRANCH_MODULES = {"clip": ("clip_projector",), "dino": ("detection_model", "detection_projector"),
                  "sam": ("seg_model", "seg_projector")}


def unsupported_message(kind: str, vpt_config) -> str:
    """Why a re-encoding request of `kind` cannot be served, for a result's `error`."""
    if kind in vpt_config.vision_encoder_ls:
        modules = " and ".join(f"{m}=" for m in BRANCH_MODULES[kind])
        return (f"the model asked for {kind} re-encoding: its config names the {kind} branch, but the engine was "
                f"built without its modules (give {modules} to vpt_fast.accelerate)")
    return (f"the model asked for {kind} re-encoding, which this checkpoint has no branch for "
            f"(vision_encoder_ls {list(vpt_config.vision_encoder_ls)})")
