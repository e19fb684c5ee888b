"""Regenerate golden.json (and the dino/ and sam/ checkpoints) with the published VPT model class.

Run by hand, in an environment of its own with transformers 4.45.2 (see README.md here):

    python tests/data/original/make_golden.py --modeling /path/to/modeling_qwen2_vl_vpt.py

`--modeling` is the published modeling file of the VPT repository (the one that defines
`VPT_Qwen2VLForConditionalGeneration`); its folder is put on the import path, so sibling files it
imports are found there. Nothing is downloaded. This script only imports that file and calls its
public class (`from_pretrained`, `generate`, `save_pretrained`); the conversation, the image
preprocessing and the round-1 parsing around it are written here from VPT_SPEC.md (sections 7-8).

The published constructor asks the hub for two configs when a checkpoint has a DINOv2 or a SAM
branch (`AutoConfig.from_pretrained('facebook/dinov2-large')`, `SamModel.from_pretrained(
'facebook/sam-vit-large')`). Here those two names of the imported module are replaced by offline
stand-ins that build the small encoders that `vpt_detection_config` / `vpt_seg_config` of the
checkpoint's config.json describe; every weight then comes from the checkpoint.

`--check` recomputes the records and compares them with golden.json instead of writing it (ids and
boxes exactly, logits within 1e-6), `--only` limits the run to some records.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden.json"

ROUND1_MAX_NEW_TOKENS = 24
ROUND2_MAX_NEW_TOKENS = 16
SYSTEM_PROMPT = "You are a helpful assistant."
REGION_TRIGGER = "Identify the region that can help you answer the question, and then answer the question."
REENCODE_TRIGGER = "Require additional perception features, and then answer the question."

# Token strings of the re-encoding kinds: action start, action, action end, image pad.
ACTIONS = {
    "clip": ("<|clip_action_start|>", "<|clip_action|>", "<|clip_action_end|>", "<|clip_image_pad|>"),
    "dino": ("<|detection_action_start|>", "<|detection_action|>", "<|detection_action_end|>",
             "<|detection_image_pad|>"),
    "sam": ("<|seg_action_start|>", "<|seg_action|>", "<|seg_action_end|>", "<|seg_image_pad|>"),
}
CONFIG_PREFIX = {"clip": "clip", "dino": "detection", "sam": "seg"}
REGION_BLOCK = re.compile(r"<\|region_token_start\|>(?:<\|[xy]_[0-7]\|>)+<\|region_token_end\|>")
GRID_CELLS = 8

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# The small branch encoders of the new checkpoints. DINOv2 keeps the released model's 518-pixel
# position table (so the 224-pixel input interpolates it, as with dinov2-large); SAM keeps the
# released geometry the published projector insists on: 1024-pixel input, 16-pixel patches
# (a 64 x 64 grid), 256 output channels, windowed attention with padding (64 is no multiple of 14).
TINY_DINO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=518,
                 patch_size=14, num_channels=3, qkv_bias=True, layerscale_value=1.0, hidden_act="gelu",
                 layer_norm_eps=1e-6)
TINY_SAM = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, output_channels=256, image_size=1024,
                patch_size=16, num_channels=3, mlp_dim=64, window_size=14, global_attn_indexes=[1], qkv_bias=True,
                use_abs_pos=False, use_rel_pos=True, layer_norm_eps=1e-6, hidden_act="gelu")
NEW_CHECKPOINTS = {"dino": ("vpt_detection_config", TINY_DINO, 1), "sam": ("vpt_seg_config", TINY_SAM, 2)}


def region_text(*blocks):
    """Region blocks as text: each block is (x cells, y cells)."""
    out = ""
    for xs, ys in blocks:
        out += "<|region_token_start|>" + "".join(f"<|x_{x}|>" for x in xs) + "".join(f"<|y_{y}|>" for y in ys)
        out += "<|region_token_end|>"
    return out


def action_text(kind):
    return "".join(ACTIONS[kind][:3])


# ----------------------------------------------------------------------------- the cases

# One request: checkpoint folder ("variant"), image file, user prompt, and the round-1 text a
# logits processor scripts in the forced record (its free twin generates round 1 greedily).
# "teach": what the new checkpoints were trained to say to that prompt in round 1 and in round 2,
# so that the free records see the model ask for a perception by itself (the random region/ and
# clip/ models never do: their free records end after round 1). Requests sharing a "batch" run in one call.
CASES = [
    dict(name="region1", variant="region", image="region1.png",
         prompt="<image>\nWhat is the color of the car? " + REGION_TRIGGER,
         script="<|region_token_start|><|x_2|><|y_5|><|x_4|><|y_6|><|region_token_end|><|im_end|>"),
    dict(name="clip", variant="clip", image="clip.png",
         prompt="<image>\nHow many people? " + REENCODE_TRIGGER, script=action_text("clip") + "<|im_end|>"),
    # Several regions, on a two-pass model (the free-choice -Det model).
    dict(name="region3", variant="dino", image="street.png",
         prompt="<image>\nWhat does the sign say? " + REGION_TRIGGER,
         script=region_text(([5, 1, 3], [2]), ([0], [0]), ([7], [6, 7])) + "<|im_end|>",
         teach=(region_text(([1, 2], [1]), ([6], [3, 4]), ([3], [6])) + "<|im_end|>", "The answer is stop.<|im_end|>")),
    # Text before the action: round 2 shows the fixed action text instead.
    dict(name="dino", variant="dino", image="clip.png",
         prompt="<image>\nIs there a dog on the left side of the image? " + REENCODE_TRIGGER,
         script="Let me look closer. " + action_text("dino") + "<|im_end|>",
         teach=(action_text("dino") + "<|im_end|>", "Yes, a dog.<|im_end|>")),
    dict(name="sam", variant="sam", image="street.png",
         prompt="<image>\nHow many people are in the picture? " + REENCODE_TRIGGER,
         script=action_text("sam") + "<|im_end|>",
         teach=(action_text("sam") + "<|im_end|>", "Three people.<|im_end|>")),
    # The free-choice model (the released -Det-NoPrompt): no trigger sentence; it may ask for a
    # region or for DINOv2 features. Scripted: DINOv2 features; taught: one region.
    dict(name="choice", variant="dino", image="region1.png", prompt="<image>\nWhat is the color of the car?",
         script=action_text("dino") + "<|im_end|>",
         teach=(region_text(([1, 2, 3], [4, 7])) + "<|im_end|>", "The answer is red.<|im_end|>")),
    # One call, five requests of different lengths (left-padded): a region, two clip
    # re-encodings of different images (one after some text), a plain answer, and a row that
    # stops right after the action start.
    dict(name="batch_clip", variant="clip", rows=[
        dict(image="region1.png", prompt="<image>\nWhat is the color of the car? " + REGION_TRIGGER,
             script=region_text(([3], [1, 2])) + "<|im_end|>"),
        dict(image="clip.png", prompt="<image>\nHow many people? " + REENCODE_TRIGGER,
             script=action_text("clip") + "<|im_end|>"),
        dict(image="street.png", prompt="<image>\nDescribe the image in one sentence. " + REENCODE_TRIGGER,
             script="The answer is " + action_text("clip") + "<|im_end|>"),
        dict(image="clip.png", prompt="<image>\nWhat does the sign say?", script="The sign says stop.<|im_end|>"),
        # <|im_end|> right after the action start, while the other rows go on.
        dict(image="region1.png", prompt="<image>\nHow many people? " + REENCODE_TRIGGER,
             script="<|clip_action_start|><|im_end|>"),
    ]),
    # The same on the taught -Det model: free, the rows ask for one region, DINOv2 features and
    # three regions in the same call.
    dict(name="batch_dino", variant="dino", rows=[
        dict(image="region1.png", prompt="<image>\nWhat is the color of the car?",
             script=region_text(([0, 7], [3])) + "<|im_end|>"),
        dict(image="clip.png", prompt="<image>\nIs there a dog on the left side of the image? " + REENCODE_TRIGGER,
             script=action_text("dino") + "<|im_end|>"),
        dict(image="street.png", prompt="<image>\nWhat does the sign say? " + REGION_TRIGGER,
             script=region_text(([4], [4])) + action_text("dino") + "<|im_end|>"),
        dict(image="clip.png", prompt="<image>\nHow many people?", script="There are three people.<|im_end|>"),
    ]),
]


def all_requests():
    """Every record to make, forced first: dicts with name, variant, image, prompt, script (None:
    free), forced, group (the records run in one call share it) and, in a batch, row."""
    out = []
    for forced in (True, False):
        for c in CASES:
            suffix = "" if forced else "_free"
            rows = c.get("rows") or [c]
            for i, row in enumerate(rows):
                r = dict(variant=c["variant"], image=row["image"], prompt=row["prompt"], forced=forced,
                         script=row["script"] if forced else None, group=c["name"] + suffix)
                if "rows" in c:
                    r.update(name=f"{c['name']}{suffix}_{i}", batch=c["name"] + suffix, row=i)
                else:
                    r["name"] = c["name"] + suffix
                out.append(r)
    return out


def lessons(variant):
    """(image, prompt, round-1 text, answer) the new checkpoint `variant` is taught."""
    return [(c["image"], c["prompt"], *c["teach"]) for c in CASES if c.get("teach") and c["variant"] == variant]


# ----------------------------------------------------------------------------- images


def make_street_image(path: Path) -> None:
    """A deterministic 1100 x 700 RGBA picture (wider than both caps: 512 and SAM's 1024)."""
    rs = np.random.RandomState(7)
    h, w = 700, 1100
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 4), dtype=np.uint8)
    img[..., 0] = (xx * 255 // w).astype(np.uint8)
    img[..., 1] = (yy * 255 // h).astype(np.uint8)
    img[..., 2] = ((xx + yy) % 256).astype(np.uint8)
    img[..., 3] = 255
    for _ in range(40):
        x0, y0 = rs.randint(0, w - 40), rs.randint(0, h - 40)
        bw, bh = rs.randint(10, 200), rs.randint(10, 150)
        img[y0:y0 + bh, x0:x0 + bw, :3] = rs.randint(0, 256, 3)
        img[y0:y0 + bh, x0:x0 + bw, 3] = rs.randint(64, 256)
    Image.fromarray(img, "RGBA").save(path, optimize=True)


def cap(image: Image.Image, max_side: int) -> Image.Image:
    """VPT_SPEC 8.1: shrink (NEAREST) to max_side, RGB, grow sides under 28, clamp the aspect ratio."""
    w, h = image.size
    if max(w, h) > max_side:
        r = max_side / max(w, h)
        image = image.resize((int(w * r), int(h * r)), resample=Image.NEAREST)
    if image.mode != "RGB":
        image = image.convert("RGB")
    w, h = image.size
    if min(w, h) < 28:
        image = image.resize((max(w, 28), max(h, 28)), resample=Image.NEAREST)
    w, h = image.size
    if w / h > 200:
        image = image.resize((h * 180, h), resample=Image.NEAREST)
    elif h / w > 200:
        image = image.resize((w, w * 180), resample=Image.NEAREST)
    return image


def region_box(xs, ys, width, height):
    """VPT_SPEC 7: the cells named, widened by one each side, in pixels of the original image."""
    x0, x1 = max(min(xs) - 1, 0), min(max(xs) + 1, GRID_CELLS - 1)
    y0, y1 = max(min(ys) - 1, 0), min(max(ys) + 1, GRID_CELLS - 1)
    return [int(x0 * width / GRID_CELLS), int(y0 * height / GRID_CELLS),
            int((x1 + 1) * width / GRID_CELLS), int((y1 + 1) * height / GRID_CELLS)]


# ----------------------------------------------------------------------------- the published class


def import_published(path: Path):
    if path.is_dir():
        found = sorted(path.glob("modeling_*vpt*.py"))
        if len(found) != 1:
            raise SystemExit(f"--modeling {path}: expected one modeling_*vpt*.py there, found {found}")
        path = found[0]
    if not path.exists():
        raise SystemExit(f"--modeling {path}: no such file")
    sys.path.insert(0, str(path.parent))  # for the sibling files it may import
    spec = importlib.util.spec_from_file_location("published_vpt_modeling", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("VPT_Qwen2VLForConditionalGeneration", "VPT_Qwen2VLConfig"):
        if not hasattr(module, name):
            raise SystemExit(f"{path} defines no {name}")
    return module


class BranchConfigs:
    """The small DINOv2 / SAM encoders the next published constructor call builds (see the module doc)."""

    dino: dict | None = None
    sam: dict | None = None


def install_offline_branches(module) -> None:
    from transformers import Dinov2Config, SamConfig, SamModel

    class OfflineAutoConfig:
        @staticmethod
        def from_pretrained(name, *args, **kwargs):
            if BranchConfigs.dino is None:
                raise RuntimeError(f"config of {name!r} asked for, but the checkpoint describes no DINOv2 branch")
            return Dinov2Config(**BranchConfigs.dino)

    class OfflineSamModel:
        @staticmethod
        def from_pretrained(name, *args, **kwargs):
            if BranchConfigs.sam is None:
                raise RuntimeError(f"{name!r} asked for, but the checkpoint describes no SAM branch")
            return SamModel(SamConfig(vision_config=BranchConfigs.sam))

    module.AutoConfig = OfflineAutoConfig
    module.SamModel = OfflineSamModel


def load_model(module, folder: Path):
    """The published class's from_pretrained, in float32 (new checkpoints are stored in bfloat16)."""
    cfg = json.loads((folder / "config.json").read_text())
    BranchConfigs.dino = cfg.get("vpt_detection_config")
    BranchConfigs.sam = cfg.get("vpt_seg_config")
    model, info = module.VPT_Qwen2VLForConditionalGeneration.from_pretrained(
        folder, torch_dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise RuntimeError(f"{folder}: the published class does not load it cleanly: {bad}")
    return model.eval()


def widen_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Weights with unit-gain variance (matrices ~ N(0, 1/fan_in), biases ~ N(0, 0.01), gains ~ 1 +- 0.1)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p[0].numel()))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
            else:
                p.copy_(1.0 + torch.randn(p.shape, generator=generator) * 0.1)


def round_to_bfloat16_(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())


def teach_(model, inputs, variant: str, max_steps: int = 400, lr: float = 1e-3) -> int:
    """Train the model (its own forward and loss, Adam) until the free two-round flow says what
    `lessons` says in both rounds, checked every 5 steps on the weights rounded to bfloat16 (as
    saved). Returns the steps taken."""
    todo = lessons(variant)
    cases = [dict(name=f"lesson{i}", variant=variant, image=im, prompt=p, script=None, forced=False)
             for i, (im, p, _, _) in enumerate(todo)]
    encode = lambda text: inputs.tok(text, add_special_tokens=False)["input_ids"]
    batches = []

    def add(prompt_ids, target, **images):
        ids = torch.tensor([prompt_ids + target])
        mask = torch.ones_like(ids)
        positions, _ = model.get_rope_index(ids, images["image_grid_thw"], None, mask)
        batches.append(dict(input_ids=ids, attention_mask=mask, position_ids=positions,
                            labels=torch.tensor([[-100] * len(prompt_ids) + target]), **images))

    for c, (_, _, said, answer) in zip(cases, todo):
        rows, pixels, grids, originals, firsts, users = round1_inputs(inputs, [c])
        add(rows[0], encode(said), pixel_values=pixels, image_grid_thw=grids)
        body = said.removesuffix("<|im_end|>")
        plan = plan_round2(model, inputs, body, originals[0], firsts[0], grids[0], users[0])
        add(plan[1], encode(answer), **round2_pixels(inputs, [plan]))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(1, max_steps + 1):
        optimizer.zero_grad()
        loss = sum(model(**b).loss for b in batches) / len(batches)
        loss.backward()
        optimizer.step()
        if step % 5 == 0:
            round_to_bfloat16_(model)
            got = [rec for c in cases for _, rec in run_group(model, inputs, [c])]
            print(f"  {variant} step {step}: loss {loss.item():.4f}; " + "; ".join(
                f"{r['round1_ids']} {r['answer_ids']}" for r in got), flush=True)
            if all(r["round1_ids"] == encode(said) and r["answer_ids"] == encode(answer)
                   for r, (_, _, said, answer) in zip(got, todo)):
                return step
    raise RuntimeError(f"{variant}: the lessons are not learnt after {max_steps} steps")


def write_checkpoint(module, variant: str) -> None:
    """A new tiny checkpoint written by the published class: region tokens plus the dino or sam
    branch, two inner passes, lm_head untied, weights drawn wide (seeded), then taught its lessons,
    saved in bfloat16 as the released models are."""
    folder = HERE / variant
    key, branch, seed = NEW_CHECKPOINTS[variant]
    cfg = module.VPT_Qwen2VLConfig.from_pretrained(HERE / "clip")
    tokenizer = load_tokenizer(HERE / "clip")
    ids = tokenizer.convert_tokens_to_ids
    for kind, prefix in CONFIG_PREFIX.items():
        start, action, _, pad = ACTIONS[kind]
        on = kind == variant
        setattr(cfg, f"{prefix}_action_start_id", ids(start) if on else None)
        setattr(cfg, f"{prefix}_action_id", ids(action) if on else None)
        setattr(cfg, f"{prefix}_image_token_id", ids(pad) if on else None)
    cfg.vision_encoder_ls = [variant]
    cfg.num_inner_forward_run = 2
    cfg.tie_word_embeddings = False
    setattr(cfg, key, dict(branch))
    BranchConfigs.dino = cfg.vpt_detection_config if variant == "dino" else None
    BranchConfigs.sam = cfg.vpt_seg_config if variant == "sam" else None
    torch.manual_seed(seed)
    model = module.VPT_Qwen2VLForConditionalGeneration(cfg).eval()
    widen_(model, torch.Generator().manual_seed(seed))
    folder.mkdir(exist_ok=True)
    for name in ("preprocessor_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(HERE / "clip" / name, folder / name)
    steps = teach_(model, Inputs(folder), variant)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=False)
    print(f"wrote {folder} (taught in {steps} steps)")


# ----------------------------------------------------------------------------- inputs


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


class Inputs:
    """Tokenizer and image processors of one checkpoint (the published evaluation's settings)."""

    def __init__(self, folder: Path):
        from transformers import BitImageProcessor, Qwen2VLImageProcessor, SamImageProcessor

        self.tok = load_tokenizer(folder)
        self.qwen = Qwen2VLImageProcessor.from_pretrained(folder)
        # DINOv2's processor (shortest edge 256 bicubic, center crop 224) and SAM's (longest
        # side 1024 bilinear, padded to 1024 x 1024), both with ImageNet statistics.
        self.dino = BitImageProcessor(do_resize=True, size={"shortest_edge": 256}, resample=Image.BICUBIC,
                                      do_center_crop=True, crop_size={"height": 224, "width": 224}, do_rescale=True,
                                      rescale_factor=1 / 255, do_normalize=True, image_mean=IMAGENET_MEAN,
                                      image_std=IMAGENET_STD, do_convert_rgb=True)
        self.sam = SamImageProcessor(do_resize=True, size={"longest_edge": 1024}, resample=Image.BILINEAR,
                                     do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                     image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, do_pad=True,
                                     pad_size={"height": 1024, "width": 1024}, do_convert_rgb=True)
        self.eos_id = self.tok.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = self.tok.pad_token_id

    def qwen_inputs(self, images):
        out = self.qwen(images=images, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def merged_tokens(self, grid_thw) -> int:
        return int(grid_thw.prod()) // (self.qwen.merge_size ** 2)

    def span(self, pad: str, n: int) -> str:
        return "<|vision_start|>" + pad * n + "<|vision_end|>"

    def encode(self, turns) -> list[int]:
        text = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        for role, content in turns:
            text += f"<|im_start|>{role}\n{content}<|im_end|>\n"
        text += "<|im_start|>assistant\n"
        return self.tok(text, add_special_tokens=False)["input_ids"]


def user_turn(prompt: str, image_span: str) -> str:
    return prompt.replace("<image>", image_span, 1) if "<image>" in prompt else image_span + prompt


# ----------------------------------------------------------------------------- generation


class ScriptedRound:
    """A logits processor: row r's step i may only pick script[r][i] (a row without script is free).
    It leaves the logits it is given as they are (generate keeps those as the raw logits)."""

    def __init__(self, scripts, prompt_len):
        self.scripts, self.prompt_len = scripts, prompt_len

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_len
        scores = scores.clone()
        for r, script in enumerate(self.scripts):
            if script is not None and step < len(script):
                keep = scores[r, script[step]].clone()
                scores[r] = -math.inf
                scores[r, script[step]] = keep
        return scores


def generate(model, inputs: Inputs, rows, max_new_tokens, scripts=None, **extra):
    """One published `generate` call over rows (left-padded), greedy; returns (new ids up to and
    with the first <|im_end|>, raw logits of those steps) per row."""
    from transformers import LogitsProcessorList

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), inputs.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    processors = LogitsProcessorList([ScriptedRound(scripts, width)] if scripts and any(scripts) else [])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             num_beams=1, logits_processor=processors, eos_token_id=inputs.eos_id,
                             pad_token_id=inputs.pad_id, return_dict_in_generate=True, output_logits=True, **extra)
    new = out.sequences[:, width:]
    logits = torch.stack(out.logits, dim=1)  # (rows, steps, vocab)
    results = []
    for i in range(len(rows)):
        row = new[i].tolist()
        if inputs.eos_id in row:
            n = row.index(inputs.eos_id) + 1
        else:  # the length limit, or a finished row whose <|im_end|> the published code rewrote
            n = len(row)
            while n and row[n - 1] == inputs.pad_id:
                n -= 1
        results.append((row[:n], logits[i, :n]))
    return results


def round1_inputs(inputs: Inputs, cases):
    """Round 1 of each request: prompt ids, the capped first images' pixels and grids, the images."""
    originals = []
    for c in cases:
        with Image.open(HERE / c["image"]) as im:
            im.load()
            originals.append(im.copy() if im.mode != "P" else im.convert("RGBA"))
    firsts = [cap(im, 512) for im in originals]
    pixels, grids = inputs.qwen_inputs(firsts)
    users = [user_turn(c["prompt"], inputs.span("<|image_pad|>", inputs.merged_tokens(g))) for c, g in zip(cases, grids)]
    rows = [inputs.encode([("user", u)]) for u in users]
    return rows, pixels, grids, originals, firsts, users


def round1_generate(model, inputs: Inputs, cases):
    rows, pixels, grids, *_ = round1_inputs(inputs, cases)
    scripts = [inputs.tok(c["script"], add_special_tokens=False)["input_ids"] if c["script"] else None for c in cases]
    return generate(model, inputs, rows, ROUND1_MAX_NEW_TOKENS, scripts, pixel_values=pixels, image_grid_thw=grids)


def parse_round1(text: str) -> tuple[str, list]:
    """VPT_SPEC 7: ("several" | "clip" | "dino" | "sam" | "region" | "malformed" | "none", region cells)."""
    asked = [k for k in ("clip", "dino", "sam") if ACTIONS[k][0] in text]
    blocks = REGION_BLOCK.findall(text)
    found = asked + (["region"] if blocks else [])
    if len(found) > 1:
        return "several", []
    if asked:
        return asked[0], []
    if blocks:
        cells = []
        for b in blocks:
            xs = [int(m) for m in re.findall(r"<\|x_([0-7])\|>", b)]
            ys = [int(m) for m in re.findall(r"<\|y_([0-7])\|>", b)]
            cells.append((xs, ys))
        if any(not xs or not ys for xs, ys in cells):
            return "malformed", []  # a block naming no x or no y cell has no region
        return "region", cells
    return "none", []


def plan_round2(model, inputs: Inputs, text: str, original, first, grid, user: str):
    """VPT_SPEC 7 after a round-1 text: (perception kind, round-2 prompt ids or None, images for the
    <|image_pad|> runs, (kind, image) for a re-encoding branch or None, region boxes or None)."""
    kind, cells = parse_round1(text)
    turns = [("user", user)]
    if kind == "region":
        w, h = original.size
        boxes = [region_box(xs, ys, w, h) for xs, ys in cells]
        crops = [cap(original.crop(tuple(b)), 512) for b in boxes]
        _, crop_grids = inputs.qwen_inputs(crops)
        spans = [inputs.span("<|image_pad|>", inputs.merged_tokens(g)) for g in crop_grids]
        shown = spans[0] if len(spans) == 1 else "".join(f"Region {j}: {s}\n" for j, s in enumerate(spans))
        turns += [("assistant", text), ("user", shown)]
        return kind, inputs.encode(turns), [first, *crops], None, boxes
    if kind in ACTIONS and getattr(model.config, f"{CONFIG_PREFIX[kind]}_action_id") is None:
        return f"unsupported:{kind}", None, [], None, None  # the checkpoint has no such branch
    if kind in ACTIONS:
        start, action, end, pad = ACTIONS[kind]
        if kind == "clip":  # the first image again, as prepared for round 1
            reencode, n = first, inputs.merged_tokens(grid)
        elif kind == "dino":
            reencode, n = cap(original, 512), 256
        else:
            reencode, n = cap(original, 1024), 256
        turns += [("assistant", start + action + end), ("user", inputs.span(pad, n))]
        return kind, inputs.encode(turns), [first], (kind, reencode), None
    return kind, None, [], None, None


def round2_pixels(inputs: Inputs, plans) -> dict:
    """The image inputs of the published forward for the round-2 requests `plans` (one call)."""
    pixels, grids = inputs.qwen_inputs([im for p in plans for im in p[2]])
    more = dict(pixel_values=pixels, image_grid_thw=grids)
    branch = {k: [p[3][1] for p in plans if p[3] and p[3][0] == k] for k in ACTIONS}
    if branch["clip"]:
        more["clip_pixel_values"], more["clip_images_grid_thw"] = inputs.qwen_inputs(branch["clip"])
    if branch["dino"]:
        more["detection_images"] = inputs.dino(images=branch["dino"], return_tensors="pt")["pixel_values"]
    if branch["sam"]:
        more["seg_images"] = inputs.sam(images=branch["sam"], return_tensors="pt")["pixel_values"]
    return more


def run_group(model, inputs: Inputs, cases) -> list[tuple[str, dict]]:
    """The two rounds of VPT_SPEC 7 for the requests of one call; returns (name, record) pairs."""
    tok = inputs.tok
    rows, pixels, grids, originals, firsts, users = round1_inputs(inputs, cases)
    scripts = [tok(c["script"], add_special_tokens=False)["input_ids"] if c["script"] else None for c in cases]
    round1 = generate(model, inputs, rows, ROUND1_MAX_NEW_TOKENS, scripts, pixel_values=pixels, image_grid_thw=grids)

    records, plans = [], []
    for i, c in enumerate(cases):
        ids, logits = round1[i]
        body = ids[:-1] if ids and ids[-1] == inputs.eos_id else ids
        plan = plan_round2(model, inputs, tok.decode(body, skip_special_tokens=False), originals[i], firsts[i],
                           grids[i], users[i])
        rec = {"prompt": c["prompt"], "round1_ids": ids, "round1_prompt_ids": rows[i]}
        if plan[4] is not None:
            rec["boxes"] = plan[4]
        extra = {"round1_forced": c["forced"], "perception": plan[0],
                 "round1_top_logit": [float(v.max()) for v in logits]}
        if plan[1] is not None:
            plans.append((i, plan))
        records.append((rec, extra))

    if plans:
        more = round2_pixels(inputs, [p for _, p in plans])
        answers = generate(model, inputs, [p[1] for _, p in plans], ROUND2_MAX_NEW_TOKENS, **more)
        for (i, plan), (ids, logits) in zip(plans, answers):
            rec = records[i][0]
            rec["round2_prompt_ids"] = plan[1]
            rec["answer_ids"] = ids
            rec["answer_top_logit"] = [float(v.max()) for v in logits]
            rec["answer_first_logits"] = [round(float(v), 5) for v in logits[0]]
    out = []
    for c, script, (rec, extra) in zip(cases, scripts, records):
        if "round2_prompt_ids" not in rec:
            rec.update(round2_prompt_ids=None, answer_ids=[])
        rec.update(variant=c["variant"], image=c["image"],
                   forced_tokens=tok.convert_ids_to_tokens(script) if script else None)
        if c["name"] not in ORIGINAL_RECORDS:
            rec.update(extra)
            if "batch" in c:
                rec.update(batch=c["batch"], row=c["row"])
        out.append((c["name"], rec))
    return out


# ----------------------------------------------------------------------------- main

# The first two records, made before this script; their fields stay as they were.
ORIGINAL_RECORDS = ("region1", "clip")
# A regenerated record matches a stored one when its ids, boxes and texts are equal and its
# logits agree within these (float32 reduction order differs between machines and torch builds
# by a few units in the last place; answer_first_logits are stored rounded to 5 decimals).
LOGIT_TOL = {"answer_first_logits": 2e-5}
DEFAULT_LOGIT_TOL = 1e-5


def differences(name, want, got) -> tuple[list[str], float]:
    """What differs between two records beyond the logit tolerance, and the largest logit difference."""
    problems, worst = [], 0.0
    for key in sorted(set(want) | set(got)):
        a, b = want.get(key), got.get(key)
        if isinstance(a, list) and a and isinstance(a[0], float):
            if b is None or len(a) != len(b):
                problems.append(f"{name}.{key}: {len(a)} values != {None if b is None else len(b)}")
                continue
            d = max(abs(x - y) for x, y in zip(a, b))
            worst = max(worst, d)
            if d > LOGIT_TOL.get(key, DEFAULT_LOGIT_TOL):
                problems.append(f"{name}.{key}: differs by {d:.3g}")
        elif a != b:
            problems.append(f"{name}.{key}: {str(a)[:120]} != {str(b)[:120]}")
    return problems, worst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modeling", type=Path, required=True,
                        help="the published modeling_qwen2_vl_vpt.py (or its folder)")
    parser.add_argument("--check", action="store_true",
                        help="compare with golden.json instead of writing it; exit 1 on a difference")
    parser.add_argument("--replace", action="store_true",
                        help="write records that differ from the stored ones (by default a stored record that "
                             "still matches is kept as it is, and one that does not stops the run)")
    parser.add_argument("--only", nargs="*", help="record names (a batch row runs its whole batch)")
    parser.add_argument("--rewrite-checkpoints", action="store_true",
                        help="write dino/ and sam/ again even where they exist")
    args = parser.parse_args(argv)

    import transformers

    if transformers.__version__ != "4.45.2":
        print(f"warning: transformers {transformers.__version__}; the published code was written for 4.45.2")
    module = import_published(args.modeling)
    install_offline_branches(module)
    if not (HERE / "street.png").exists():
        make_street_image(HERE / "street.png")
    for variant in NEW_CHECKPOINTS:
        if args.rewrite_checkpoints or not (HERE / variant / "config.json").exists():
            write_checkpoint(module, variant)

    requests = all_requests()
    if args.only:
        unknown = set(args.only) - {r["name"] for r in requests}
        if unknown:
            raise SystemExit(f"unknown records: {sorted(unknown)}")
        wanted = {r["group"] for r in requests if r["name"] in args.only}
        requests = [r for r in requests if r["group"] in wanted]
    groups: dict[str, list] = {}
    for r in requests:
        groups.setdefault(r["group"], []).append(r)

    stored = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    models, records, problems = {}, {}, []
    for group in groups.values():
        variant = group[0]["variant"]
        if variant not in models:
            models[variant] = (load_model(module, HERE / variant), Inputs(HERE / variant))
        for name, rec in run_group(*models[variant], group):
            found, worst = differences(name, stored[name], rec) if name in stored else ([], 0.0)
            problems += found
            records[name] = rec if (found and args.replace) or name not in stored else stored[name]
            state = "new" if name not in stored else ("DIFFERS" if found else f"matches (logits within {worst:.2g})")
            print(f"{name}: round 1 {rec['round1_ids']} -> {rec.get('perception', 'scripted')}, "
                  f"answer {rec['answer_ids']}: {state}")

    if problems:
        print("\n".join(problems))
    if args.check or (problems and not args.replace):
        print("golden.json left as it is")
        return 1 if problems else 0
    order = [r["name"] for r in all_requests()]
    merged = {name: records.get(name, stored.get(name)) for name in order if name in records or name in stored}
    GOLDEN.write_text(json.dumps(merged, indent=1))
    print(f"wrote {GOLDEN} ({len(merged)} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
