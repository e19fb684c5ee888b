"""Prefix caching and the encoder cache, on against off, in the same run.

(a) Evaluation: `vpt_fast.eval.evaluate` (what `vpt-fast eval` runs) over a JSONL with four
    questions per image, the questions of an image on consecutive lines, answered one after
    another (batch 1) and in batches of 8; the same engine settings with the caches on and
    off. Reported: requests/s, prompt tokens computed, the share served from the prefix
    cache, images encoded.
(b) A chat of five turns about one image: each turn sends the whole conversation again (as a
    chat client does), the answers scripted so that both runs read the same conversation.
    Reported per turn: time to first token (median over several chats), prompt tokens, and
    tokens found in the cache against what the turn before left in it (everything but its
    last partial block).

    python benchmarks/prefix_cache.py --device cpu          # the tiny model, 900x700 images
    python benchmarks/prefix_cache.py --shape 2b            # a GPU, 2B shapes, bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, sync, table, write_results  # noqa: E402

from vpt_fast import SamplingParams  # noqa: E402
from vpt_fast.engine import Engine, FinishEvent, TokenEvent  # noqa: E402
from vpt_fast.eval import cache_counts, evaluate  # noqa: E402
from vpt_fast.prompt import Conversation  # noqa: E402

QUESTIONS = ["What is the color of the car?", "How many people are in the picture?", "What is written on the sign?",
             "Is it day or night?"]
ANSWERS = ["The car is red and parked by the road.", "There are three people standing near the door.",
           "The sign says that the shop is open today.", "It is day: the sky is bright and clear."]


def bundle_for(shape: str, device: torch.device):
    if shape == "tiny":
        from vpt_fast.checkpoint import load_vpt_checkpoint
        from vpt_fast.tiny import demo_checkpoint

        return load_vpt_checkpoint(demo_checkpoint("region"), device=device)
    from e2e import build_bundle

    return build_bundle(shape, "clip", torch.bfloat16, device)


def picture(seed: int, w: int, h: int) -> Image.Image:
    """A smooth random picture (noise compresses badly and decodes slowly, unlike photographs)."""
    rs = np.random.RandomState(seed)
    small = rs.randint(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)


def eval_runs(bundle, images: int, size: tuple[int, int], answer_lengths: list[int], folder: Path) -> list[dict]:
    lines = []
    for i in range(images):
        picture(i, *size).save(folder / f"{i}.png")
        lines += [{"id": f"{i}-{q}", "image": f"{i}.png", "question": question} for q, question in enumerate(QUESTIONS)]
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    rows = []
    for max_new_tokens, batch in ((n, b) for n in answer_lengths for b in (1, 8)):
        row = {"answer_tokens": max_new_tokens, "batch": batch, "requests": len(lines)}
        for caching in (False, True):
            engine = Engine(bundle, max_batch_size=8, enable_prefix_caching=caching,
                            encoder_cache_gib=None if caching else 0)
            engine.generate([picture(999, *size)], ["<image>\nWarm up."], 4)  # (compiles, allocates)
            out = folder / f"out_{max_new_tokens}_{batch}_{caching}.jsonl"
            before = cache_counts(engine)
            summary = evaluate(data, out, engine, batch_size=batch, max_new_tokens=max_new_tokens, progress=False)
            counts = {k: v - before[k] for k, v in cache_counts(engine).items()}
            tag = "on" if caching else "off"
            row[f"{tag}_req_per_s"] = summary.items / summary.seconds
            row[f"{tag}_seconds"] = summary.seconds
            row[f"{tag}_computed_prompt_tokens"] = counts["computed_prompt_tokens"]
            row[f"{tag}_images_encoded"] = counts["vision_encoder_images"]
            row["prompt_tokens"] = counts["prompt_tokens"]
            if caching:
                row["cached_share"] = counts["cached_prompt_tokens"] / counts["prompt_tokens"]
            print(f"eval, answers of {max_new_tokens} tokens, batch {batch}, caches {tag}: "
                  f"{row[f'{tag}_req_per_s']:.2f} requests/s, "
                  f"{counts['computed_prompt_tokens']} of {counts['prompt_tokens']} prompt tokens computed, "
                  f"{counts['vision_encoder_images']} images encoded", flush=True)
        row["wall_ratio"] = row["on_seconds"] / row["off_seconds"]
        with open(folder / f"out_{max_new_tokens}_{batch}_False.jsonl") as a, \
                open(folder / f"out_{max_new_tokens}_{batch}_True.jsonl") as b:
            row["same_rows"] = a.read() == b.read()
        rows.append(row)
    return rows


def chat_runs(bundle, chats: int, size: tuple[int, int], device: torch.device) -> list[dict]:
    """Per turn: median time to first token with the caches on and off, prompt tokens, tokens
    found in the cache, and what the turn before left there (its tokens, but the last partial block)."""
    tok = bundle.tokenizer
    per_turn = {k: {"on": [], "off": [], "found": [], "left": [], "prompt": []} for k in range(len(QUESTIONS) + 1)}
    for caching in (True, False):
        engine = Engine(bundle, enable_prefix_caching=caching, encoder_cache_gib=None if caching else 0)
        bs = engine.cache.block_size
        engine.generate([picture(998, *size)], ["<image>\nWarm up."], 4)
        for c in range(chats):
            image, turns, previous = picture(100 + c, *size), [], None
            for k in range(len(QUESTIONS) + 1):
                turns.append(("user", ("<image>\n" if k == 0 else "") + (QUESTIONS + ["Thank you."])[k]))
                forced = tok(ANSWERS[k] + "<|im_end|>", add_special_tokens=False)["input_ids"] if k < len(ANSWERS) else None
                before = engine.stats()["cached_prompt_tokens"]
                sync(device)
                start = time.perf_counter()
                rid = engine.add_request(image, Conversation(tuple(turns)), SamplingParams(max_new_tokens=32), forced)
                first = None
                while engine.has_unfinished():
                    for event in engine.step():
                        if first is None and isinstance(event, TokenEvent) and event.request == rid:
                            sync(device)
                            first = time.perf_counter() - start
                        if isinstance(event, FinishEvent):
                            result = event.result
                per_turn[k]["on" if caching else "off"].append(first)
                if caching:
                    per_turn[k]["found"].append(engine.stats()["cached_prompt_tokens"] - before)
                    per_turn[k]["prompt"].append(result.prompt_tokens)
                    per_turn[k]["left"].append(0 if previous is None else (len(previous.sequence_ids) - 1) // bs * bs)
                previous = result
                if k < len(ANSWERS):
                    turns.append(("assistant", result.text))
    rows = []
    for k, t in per_turn.items():
        rows.append({"turn": k + 1, "prompt_tokens": statistics.median(t["prompt"]),
                     "found": statistics.median(t["found"]), "left_by_the_turn_before": statistics.median(t["left"]),
                     "ttft_on_ms": 1e3 * statistics.median(t["on"]), "ttft_off_ms": 1e3 * statistics.median(t["off"])})
    for row in rows:
        row["ttft_vs_turn2"] = row["ttft_on_ms"] / rows[1]["ttft_on_ms"]
        row["on_vs_off"] = row["ttft_on_ms"] / row["ttft_off_ms"]
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default=None, choices=["tiny", "2b", "7b"], help="default: 2b on a GPU, tiny on the CPU")
    ap.add_argument("--images", type=int, default=8, help="images of the evaluation set (four questions each)")
    ap.add_argument("--chats", type=int, default=5)
    ap.add_argument("--size", type=int, nargs=2, default=(900, 700), metavar=("W", "H"))
    ap.add_argument("--max-new-tokens", type=int, nargs="+", default=[4, 16],
                    help="answer lengths of the evaluation (the random tiny model always writes all of them)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on the CPU")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = args.shape or ("2b" if device.type == "cuda" else "tiny")
    bundle = bundle_for(shape, device)
    env = environment(device)
    env.update(shape=shape, image_size=list(args.size))
    with tempfile.TemporaryDirectory() as folder:
        evals = eval_runs(bundle, args.images, tuple(args.size), args.max_new_tokens, Path(folder))
    chats = chat_runs(bundle, args.chats, tuple(args.size), device)
    md = (f"### Prefix and encoder caches, on against off ({shape}, {args.size[0]}x{args.size[1]} images)\n\n"
          f"(a) `evaluate` over {args.images} images x {len(QUESTIONS)} questions (consecutive lines), answers of "
          f"{' and '.join(map(str, args.max_new_tokens))} tokens:\n\n")
    md += table(evals, [("answer_tokens", "answer tokens"), ("batch", "batch"), ("off_req_per_s", "off req/s"), ("on_req_per_s", "on req/s"),
                        ("wall_ratio", "wall on / off"), ("prompt_tokens", "prompt tokens"),
                        ("off_computed_prompt_tokens", "computed, off"), ("on_computed_prompt_tokens", "computed, on"),
                        ("cached_share", "from the cache"), ("off_images_encoded", "images encoded, off"),
                        ("on_images_encoded", "images encoded, on"), ("same_rows", "same rows")])
    md += (f"\n\n(b) A chat of {len(QUESTIONS) + 1} turns about one image, the whole conversation sent each turn "
           f"(median of {args.chats} chats):\n\n")
    md += table(chats, [("turn", "turn"), ("prompt_tokens", "prompt tokens"), ("found", "found in the cache"),
                        ("left_by_the_turn_before", "left by the turn before"), ("ttft_off_ms", "TTFT off (ms)"),
                        ("ttft_on_ms", "TTFT on (ms)"), ("on_vs_off", "on / off"), ("ttft_vs_turn2", "on / turn 2")])
    print(f"card: {env['card']}\n{md}")
    write_results(f"prefix_cache_{shape}", env, [{"eval": evals, "chat": chats}], md)


if __name__ == "__main__":
    main()
