"""`vpt-fast run | make-tiny`: answer questions about images with a VPT model."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from . import spec

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DEMO_FORCE = "<|region_token_start|><|x_2|><|y_3|><|x_5|><|y_5|><|region_token_end|><|im_end|>"


def _images(path: str) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise SystemExit(f"error: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {p}")
        return found
    if not p.exists():
        raise SystemExit(f"error: image {p} does not exist")
    return [p]


def _prompt(question: str, mode: str) -> str:
    trigger = {"region": spec.REGION_TRIGGER, "reencode": spec.REENCODE_TRIGGER, "free": None}[mode]
    text = question.rstrip()
    if trigger:
        text = f"{text} {trigger}."
    return text if "<image>" in text else "<image>\n" + text


def _force_ids(tokenizer, text: str | None) -> list[int] | None:
    if not text:
        return None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise SystemExit(f"error: --force {text!r} encodes to no tokens")
    return ids


def _draw_trace(image_path: Path, boxes, out: Path) -> None:
    from PIL import ImageDraw

    from .preprocess import load_image, to_rgb

    picture = to_rgb(load_image(image_path)).copy()
    draw = ImageDraw.Draw(picture)
    width = max(2, min(picture.size) // 150)
    for box in boxes:
        draw.rectangle(box, outline=(255, 40, 40), width=width)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out)


def cmd_run(args) -> int:
    from tqdm import tqdm

    from .checkpoint import load_vpt_checkpoint
    from .engine import Engine
    from .reference import two_round_generate
    from .tiny import make_tiny_checkpoint

    images = _images(args.image)
    force = args.force
    if args.model is None:
        folder = Path(tempfile.mkdtemp(prefix="vpt_fast_tiny_")) / "region"
        make_tiny_checkpoint(folder, "region")
        print("No --model given: using a tiny RANDOM checkpoint built here. Its answers are noise;")
        print("a region selection is scripted so the whole perception path runs.\n")
        force = force or DEMO_FORCE
        model_path = folder
    else:
        model_path = Path(args.model)
    bundle = load_vpt_checkpoint(model_path, device=args.device)
    forced = _force_ids(bundle.tokenizer, force)
    prompt = _prompt(args.question, args.mode)
    if args.pipeline == "engine":
        engine = Engine(bundle, max_seq_len=args.max_seq_len)
        run = lambda chunk, n: engine.generate(chunk, [prompt] * n, args.max_new_tokens, [forced] * n)
    else:
        run = lambda chunk, n: two_round_generate(bundle, chunk, [prompt] * n, args.max_new_tokens, [forced] * n)
    results = []
    batches = range(0, len(images), args.batch_size)
    for start in tqdm(batches, desc="batches", disable=not Path(args.image).is_dir()):
        chunk = images[start : start + args.batch_size]
        results += run(chunk, len(chunk))
    for path, r in zip(images, results):
        boxes = _boxes(r)
        print(f"== {path}")
        if getattr(r, "error", None):
            print(f"error: {r.error}")
        print(f"round 1: {bundle.tokenizer.decode(r.round1_ids, skip_special_tokens=False)!r}")
        kind = r.perception.kind if r.perception is not None else "nothing"
        print(f"looked at: {kind}" + (" boxes " + ", ".join(str(tuple(b)) for b in boxes) if boxes else ""))
        for t in getattr(r, "trace", []):
            print(f"  {t.kind}: {t.tokens_spliced} tokens spliced, {t.tokens_rolled_back} rolled back, {t.seconds * 1e3:.1f} ms")
        print(f"answer ({r.finish_reason}): {r.text}")
        if args.trace_image and boxes:
            out = Path(args.trace_image)
            if len(images) > 1:
                out = out.with_name(f"{out.stem}_{path.stem}{out.suffix or '.png'}")
            _draw_trace(path, boxes, out)
            print(f"trace image: {out}")
    return 0


def _boxes(result) -> list:
    """Region boxes of a result from either pipeline."""
    if hasattr(result, "trace"):
        return [box for t in result.trace if t.kind == "region" for box in t.boxes]
    return list(result.boxes)


def cmd_make_tiny(args) -> int:
    from .tiny import make_tiny_checkpoint

    folder = make_tiny_checkpoint(args.out, args.variant, seed=args.seed)
    print(f"wrote a tiny random {args.variant} checkpoint to {folder}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vpt-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="answer a question about an image (or a folder of images)")
    run.add_argument("--image", required=True, help="an image file, or a folder of images run as a batch")
    run.add_argument("--question", required=True)
    run.add_argument("--model", help="a VPT checkpoint folder (default: a tiny random one built here)")
    run.add_argument("--mode", choices=["region", "reencode", "free"], default="free",
                     help="add the trigger sentence of the prompted models")
    run.add_argument("--force", help="round-1 tokens to script, as text (e.g. '<|clip_action_start|>...')")
    run.add_argument("--trace-image", help="save the picture with the selected region(s) drawn")
    run.add_argument("--max-new-tokens", type=int, default=64)
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--device", default="cpu")
    run.add_argument("--max-seq-len", type=int, default=4096, help="KV cache positions per request")
    run.add_argument("--pipeline", choices=["engine", "reference"], default="engine",
                     help="single-pass engine, or the two-round reference flow (slow, for comparison)")
    run.set_defaults(func=cmd_run)
    tiny = sub.add_parser("make-tiny", help="write a tiny random VPT checkpoint in the released format")
    tiny.add_argument("out")
    tiny.add_argument("--variant", choices=["region", "clip", "dino", "sam"], default="region")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_make_tiny)
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # config-conversion notices are not for the person at the terminal
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
