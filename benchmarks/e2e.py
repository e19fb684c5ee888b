"""End-to-end: the single-pass engine against the two-round reference, in the same run.

Qwen2-VL-2B / 7B shapes with random weights (bf16 on a GPU), or a small configuration
on the CPU. Round-1 tokens are scripted; answers are 32 tokens (the end-of-turn token
is kept out of reach so every answer has the same length). For each scenario both
pipelines run on the same model and inputs; the table gives latency p50/p90,
requests/s, tokens/s, peak memory, and the engine's speed-up, with the host PIL image
path (exactly the reference's pixels) and with images made on the device
(`image_pipeline="device"`). Decode ms/token is compared with the bandwidth floor
(language-model weight bytes / measured copy bandwidth, bytes read and written, as the
copy counts them), and the splice (round end -> segment in the cache) with its parts
(vision tower on the crop + prefill of a segment of the same length). `--hf-generate`
times transformers' own `model.generate` against the same model's `generate` patched by
`vpt_fast.accelerate` (plain Qwen2-VL, B=1 and B=8, 64 new tokens) and says whether the
tokens are the same.

    python benchmarks/e2e.py --shape 2b                       # GPU, bf16
    python benchmarks/e2e.py --shape 7b --decode-only         # decode against the floor only
    python benchmarks/e2e.py --shape 2b --hf-generate         # transformers' generate vs the patched one
    python benchmarks/e2e.py --shape tiny --device cpu --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from common import copy_bandwidth, environment, percentile, sync, table, timed, write_results  # noqa: E402

from vpt_fast import spec  # noqa: E402
from vpt_fast.checkpoint import VPTBundle, VPTConfig, _dinov2_config, _qwen2vl_config  # noqa: E402
from vpt_fast.engine import Engine  # noqa: E402
from vpt_fast.preprocess import VPTImageProcessor  # noqa: E402
from vpt_fast.projectors import ClipProjector, DetectionProjector  # noqa: E402
from vpt_fast.reference import two_round_generate  # noqa: E402
from vpt_fast.tiny import DINO, MROPE_SECTION, TEXT, VISION, build_tokenizer  # noqa: E402

SHAPES = {
    "2b": dict(text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6,
                         max_position_embeddings=32768, hidden_act="silu", tie_word_embeddings=True),
               vision=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, in_chans=3,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu"),
               mrope=[16, 24, 24], dino=None),
    "7b": dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6, rope_theta=1e6,
                         max_position_embeddings=32768, hidden_act="silu", tie_word_embeddings=False),
               vision=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, in_chans=3,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu"),
               mrope=[16, 24, 24], dino=None),
    "tiny": dict(text=dict(TEXT, vocab_size=400, tie_word_embeddings=False), vision=dict(VISION), mrope=MROPE_SECTION,
                 dino=dict(DINO)),
}
ANSWER_TOKENS = 32
QUESTION = "<image>\nWhat is the color of the car? " + spec.REGION_TRIGGER + "."


def build_bundle(shape: str, kind: str, dtype: torch.dtype, device: torch.device) -> VPTBundle:
    """A random-weight VPT bundle of the given shape with a clip or dino branch (region tokens always)."""
    from transformers import Dinov2Model, Qwen2VLForConditionalGeneration
    from transformers.initialization import no_init_weights

    s = SHAPES[shape]
    tok = build_tokenizer()
    ids = tok.convert_tokens_to_ids
    flat = dict(s["text"], rope_scaling={"type": "mrope", "mrope_section": s["mrope"]}, vision_config=dict(s["vision"]),
                image_token_id=ids(spec.IMAGE_PAD), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids(spec.VISION_START), vision_end_token_id=ids(spec.VISION_END),
                bos_token_id=ids(spec.PAD_TOKEN), eos_token_id=ids(spec.IM_END), pad_token_id=ids(spec.PAD_TOKEN))
    vpt = {"num_inner_forward_run": 2, "vision_encoder_ls": [kind], "model_type": "qwen2_vl_vpt"}
    prefix = {"clip": "clip", "dino": "detection"}[kind]
    t = spec.ACTION_TOKENS[kind]
    vpt.update({f"{prefix}_action_start_id": ids(t.start), f"{prefix}_action_id": ids(t.action),
                f"{prefix}_image_token_id": ids(t.pad)})
    cfg = _qwen2vl_config(flat)
    cfg._attn_implementation = "sdpa"
    g = torch.Generator(device=device).manual_seed(0)
    with torch.device(device), no_init_weights():
        model = Qwen2VLForConditionalGeneration(cfg)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight

    def randomize(module):
        with torch.no_grad():
            for name, p in module.named_parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.02, generator=g)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.fill_(1.0)

    randomize(model)
    with torch.no_grad():  # the end-of-turn logit stays below the random maximum: answers run to full length
        model.lm_head.weight[ids(spec.IM_END)] = 0
    model.to(dtype).eval()
    bundle = VPTBundle(model=model, tokenizer=tok, processor=VPTImageProcessor(), vpt_config=VPTConfig.from_dict(vpt),
                       vocab=spec.Vocab.from_tokenizer(tok))
    hidden = s["text"]["hidden_size"]
    if kind == "clip":
        bundle.clip_projector = ClipProjector(hidden).to(device)
        randomize(bundle.clip_projector)
        bundle.clip_projector.to(dtype).eval()
    else:
        dcfg = _dinov2_config(s["dino"])
        with torch.device(device), no_init_weights():
            bundle.detection_model = Dinov2Model(dcfg)
            bundle.detection_projector = DetectionProjector(dcfg.hidden_size, hidden)
        randomize(bundle.detection_model)
        randomize(bundle.detection_projector)
        bundle.detection_model.to(dtype).eval()
        bundle.detection_projector.to(dtype).eval()
    return bundle


def image(seed: int, w: int = 640, h: int = 480) -> Image.Image:
    rs = np.random.RandomState(seed)
    return Image.fromarray(rs.randint(0, 256, (h, w, 3), dtype=np.uint8))


def forced_ids(tok, what: str) -> list[int]:
    text = {
        "region": "<|region_token_start|><|x_2|><|y_3|><|x_5|><|y_5|><|region_token_end|><|im_end|>",
        "clip": "<|clip_action_start|><|clip_action|><|clip_action_end|><|im_end|>",
        "dino": "<|detection_action_start|><|detection_action|><|detection_action_end|><|im_end|>",
        "none": "The car is red.<|im_end|>",
    }[what]
    return tok(text, add_special_tokens=False)["input_ids"]


MIXED_32 = [("region", "clip", "none")[i % 3] for i in range(32)]
# (name, re-encoding branch of the model, what each request's round 1 asks for)
SCENARIOS = [
    ("region B=1", "clip", ["region"]),
    ("clip B=1", "clip", ["clip"]),
    ("dino B=1", "dino", ["dino"]),
    ("mixed B=32", "clip", MIXED_32),
    ("plain B=1 (no VPT)", "clip", [None]),
]


def run_scenario(bundle, engine, device_engine, kinds, device, reps):
    tok = bundle.tokenizer
    images = [image(i) for i in range(len(kinds))]
    prompts = [QUESTION] * len(kinds)
    forced = [forced_ids(tok, k) if k else None for k in kinds]
    r1 = max((len(f) for f in forced if f), default=64)
    r1 = 64 if None in kinds else r1
    rows = {}
    runs = {
        "engine": lambda: engine.generate(images, prompts, r1, forced, answer_max_new_tokens=ANSWER_TOKENS),
        "engine_device": lambda: device_engine.generate(images, prompts, r1, forced, answer_max_new_tokens=ANSWER_TOKENS),
        "reference": lambda: two_round_generate(bundle, images, prompts, r1, forced, answer_max_new_tokens=ANSWER_TOKENS),
    }
    for name, fn in runs.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        out = []
        times = timed(lambda: out.append(fn()), device, reps, warmup=1)
        results = out[-1]
        tokens = sum(len(r.round1_ids) + len(r.answer_ids) for r in results)
        p50 = statistics.median(times)
        rows[name] = dict(p50_s=p50, p90_s=percentile(times, 90), req_per_s=len(kinds) / p50, tok_per_s=tokens / p50,
                          peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                          tokens=tokens)
        if name == "engine":
            rows[name]["splice_s"] = [t.seconds for r in results for t in r.trace]
            rows[name]["spliced_tokens"] = [t.tokens_spliced for r in results for t in r.trace]
    return rows


def decode_ms_per_token(engine: Engine, bundle, device, steps: int = 128) -> float:
    """Steady decode at B=1 through the engine's decode step (captured on CUDA), host overhead included."""
    tok = bundle.tokenizer
    engine.generate([image(0)], [QUESTION], 4)  # warm: graphs
    cache = engine.cache
    start = len(tok(QUESTION)["input_ids"]) + 300
    blocks = cache.allocate(cache.blocks_for(start + steps))
    sync(device)
    t = time.perf_counter()
    for i in range(steps):
        n = start + i + 1
        engine._decoder([100 + i % 50], [None], [n - 1], cache.slots(blocks, n - 1, n), [n], [blocks])
    sync(device)
    elapsed = time.perf_counter() - t
    cache.release(blocks)
    return elapsed / steps * 1e3


DECODE_COLUMNS = [("shape", "shape"), ("decode_ms_per_token", "ms/token"), ("floor_ms", "floor ms"),
                  ("ratio_to_floor", "x floor"), ("weight_gb", "LM weights GB")]


def decode_row(shape: str, bundle, engine: Engine, device, bw: float) -> dict:
    """Decode ms/token at B=1 against the floor: the language model's weights read once per token."""
    lm = bundle.model.model.language_model
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    if bundle.model.lm_head.weight.data_ptr() != lm.embed_tokens.weight.data_ptr():
        weight_bytes += bundle.model.lm_head.weight.numel() * bundle.model.lm_head.weight.element_size()
    ms = decode_ms_per_token(engine, bundle, device)
    floor = weight_bytes / bw * 1e3
    return dict(shape=shape, decode_ms_per_token=ms, floor_ms=floor, ratio_to_floor=ms / floor,
                weight_gb=weight_bytes / 1e9)


def splice_parts(engine: Engine, bundle, device, spliced: int, reps: int) -> float:
    """Seconds of [vision tower on the region crop + prefill of a segment of `spliced` tokens]."""
    proc, model = bundle.processor, bundle.model
    original = image(0)
    w, h = original.size
    box = spec.region_box((2, 3, 5, 5), w, h)

    def vision():
        crop = proc.prepare_crop(original, box)
        pixels, grid = proc.qwen_inputs([crop])
        with torch.no_grad():
            model.model.visual(pixels.to(device, engine.runner.dtype), grid_thw=grid.to(device))

    cache = engine.cache
    start = 400
    blocks = cache.allocate(cache.blocks_for(start + spliced))
    embeds = torch.randn(spliced, engine.runner.hidden_size, device=device, dtype=engine.runner.dtype)
    positions = torch.arange(start, start + spliced, device=device)[None].expand(3, -1)
    to = dict(device=device, dtype=torch.long)
    slots = torch.tensor(cache.slots(blocks, start, start + spliced), **to)
    tables, lens, cu = torch.tensor([blocks], **to), torch.tensor([start + spliced], **to), torch.tensor([0, spliced], **to)

    def prefill():
        engine.runner.prefill(embeds, positions, cache, slots, tables, lens, cu, spliced)

    seconds = statistics.median(timed(vision, device, reps)) + statistics.median(timed(prefill, device, reps))
    cache.release(blocks)
    return seconds


def plot(rows, decode_rows, path: Path, card_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    names = [r["scenario"] for r in rows]
    x = np.arange(len(names))
    axes[0].bar(x - 0.2, [r["reference_p50_s"] for r in rows], 0.4, label="two-round reference")
    axes[0].bar(x + 0.2, [r["engine_p50_s"] for r in rows], 0.4, label="vpt_fast engine")
    axes[0].set_yscale("log")
    axes[0].set_xticks(x, names, rotation=20, ha="right")
    axes[0].set_ylabel("latency p50 (s)")
    axes[0].legend()
    axes[0].set_title(f"End to end, {card_name}")
    axes[1].bar([r["shape"] for r in decode_rows], [r["decode_ms_per_token"] for r in decode_rows], label="engine decode")
    axes[1].scatter([r["shape"] for r in decode_rows], [r["floor_ms"] for r in decode_rows], color="k", zorder=3,
                    label="bandwidth floor")
    axes[1].set_ylabel("ms / token, B=1")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


HF_NEW_TOKENS = 64


def hf_inputs(bundle, batch: int, device) -> dict:
    """What a Qwen2-VL processor returns for `batch` chat prompts with one 640x480 image each."""
    from vpt_fast.prompt import conversation, encode, vision_span

    images = [image(100 + i) for i in range(batch)]
    pixels, grid = bundle.processor.qwen_inputs(images)
    merge = bundle.model.config.vision_config.spatial_merge_size ** 2
    rows = []
    for i in range(batch):
        span = vision_span(spec.IMAGE_PAD, int(grid[i].prod()) // merge)
        rows.append(encode(bundle.tokenizer, conversation([("user", span + "Describe this picture in detail.")])))
    ids = torch.tensor(rows, device=device)  # same-size images: equal lengths, no padding
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels.to(device),
                image_grid_thw=grid.to(device), mm_token_type_ids=(ids == bundle.vocab.image_pad).long())


def hf_generate_rows(shape: str, dtype, device, reps: int, batches=(1, 8)) -> list[dict]:
    """transformers' generate against the same model's generate patched by vpt_fast.accelerate,
    on a plain Qwen2-VL (no VPT): greedy, HF_NEW_TOKENS new tokens, in the same run."""
    import vpt_fast
    from transformers import Qwen2VLForConditionalGeneration

    bundle = build_bundle(shape, "clip", dtype, device)
    model, tok = bundle.model, bundle.tokenizer
    model.generation_config.eos_token_id = bundle.vocab.im_end
    model.generation_config.pad_token_id = tok.pad_token_id
    rows = []
    for batch in batches:
        x = hf_inputs(bundle, batch, device)
        options = dict(max_new_tokens=HF_NEW_TOKENS, do_sample=False)

        def stock():
            with torch.no_grad():
                return Qwen2VLForConditionalGeneration.generate(model, **x, **options)

        out = {}
        hf_times = timed(lambda: out.__setitem__("hf", stock()), device, reps, warmup=1)
        vpt_fast.accelerate(model, tok, max_seq_len=2048, max_batch_size=max(8, batch))
        try:
            ours = timed(lambda: out.__setitem__("vpt_fast", model.generate(**x, **options)), device, reps, warmup=1)
        finally:
            vpt_fast.restore(model)
        new = out["vpt_fast"].shape[1] - x["input_ids"].shape[1]
        hf_p50, our_p50 = statistics.median(hf_times), statistics.median(ours)
        rows.append(dict(shape=shape, batch=batch, prompt_tokens=x["input_ids"].shape[1], new_tokens=new,
                         hf_p50_s=hf_p50, patched_p50_s=our_p50, speedup=hf_p50 / our_p50,
                         hf_tok_per_s=batch * new / hf_p50, patched_tok_per_s=batch * new / our_p50,
                         same_tokens=bool(torch.equal(out["hf"], out["vpt_fast"]))))
        print(f"  {shape} B={batch}: transformers generate {hf_p50:.3f}s, patched {our_p50:.3f}s, x{hf_p50 / our_p50:.1f}")
    del bundle, model
    return rows


HF_COLUMNS = [("shape", "shape"), ("batch", "B"), ("prompt_tokens", "prompt"), ("new_tokens", "new tokens"),
              ("hf_p50_s", "transformers generate p50 s"), ("patched_p50_s", "patched generate p50 s"),
              ("speedup", "speed-up"), ("hf_tok_per_s", "transformers tok/s"), ("patched_tok_per_s", "patched tok/s"),
              ("same_tokens", "same tokens")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), nargs="+", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, 2B only on a GPU")
    ap.add_argument("--decode-only", action="store_true", help="only decode ms/token against the bandwidth floor")
    ap.add_argument("--hf-generate", action="store_true",
                    help="only transformers' generate vs the same model's patched generate (plain Qwen2-VL, B=1 and 8)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    shapes = args.shape or (["2b"] if args.quick else ["2b", "7b"]) if device.type == "cuda" else (args.shape or ["tiny"])
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    reps = args.reps or (2 if args.quick else 5)
    env = environment(device)
    bw = copy_bandwidth(device, nbytes=(1 << 30) if device.type == "cuda" else (1 << 26))
    print(f"{env['card']}: copy bandwidth {bw / 1e12:.2f} TB/s (bytes read + written)")

    rows, decode_rows = [], []
    if args.hf_generate:
        for shape in shapes:
            rows += hf_generate_rows(shape, dtype, device, reps)
        md = (f"### transformers' generate vs vpt_fast.accelerate's patched generate (plain Qwen2-VL, greedy, "
              f"{HF_NEW_TOKENS} new tokens, same run)\n\n" + table(rows, HF_COLUMNS))
        js, mdp = write_results("e2e_hf_generate", env, rows, md)
        print(md)
        print(f"wrote {js}, {mdp}")
        return 0
    if args.decode_only:
        for shape in shapes:
            bundle = build_bundle(shape, "clip", dtype, device)
            decode_rows.append(decode_row(shape, bundle, Engine(bundle, max_seq_len=1024, kv_cache_tokens=2048), device, bw))
            print(f"  {shape}: decode {decode_rows[-1]['decode_ms_per_token']:.3f} ms/token, "
                  f"floor {decode_rows[-1]['floor_ms']:.3f} ms")
            del bundle
        md = "### Decode at B=1 vs the bandwidth floor\n\n" + table(decode_rows, DECODE_COLUMNS)
        md += f"\n\nCopy bandwidth measured: {bw / 1e12:.3f} TB/s (bytes read + written)."
        js, mdp = write_results("e2e_decode", env, decode_rows, md)
        print(md)
        print(f"wrote {js}, {mdp}")
        return 0
    for shape in shapes:
        bundles = {}
        for name, kind, kinds in tqdm(SCENARIOS, desc=f"{shape} scenarios"):
            if kind not in bundles:
                bundles[kind] = build_bundle(shape, kind, dtype, device)
            bundle = bundles[kind]
            # the KV cache sized for the scenario: 1024 tokens a request, as the two-round flow never needs more here
            options = dict(max_seq_len=1024, max_batch_size=32, kv_cache_tokens=1024 * len(kinds))
            engine = Engine(bundle, **options)
            device_engine = Engine(bundle, image_pipeline="device", **options)
            r = run_scenario(bundle, engine, device_engine, kinds, device, reps)
            row = dict(shape=shape, scenario=name, batch=len(kinds))
            for pipe in ("engine", "engine_device", "reference"):
                for k, v in r[pipe].items():
                    if not isinstance(v, list):
                        row[f"{pipe}_{k}"] = v
            row["speedup"] = r["reference"]["p50_s"] / r["engine"]["p50_s"]
            row["speedup_device"] = r["reference"]["p50_s"] / r["engine_device"]["p50_s"]
            row["throughput_ratio"] = r["engine"]["req_per_s"] / r["reference"]["req_per_s"]
            if name == "region B=1" and r["engine"]["splice_s"]:
                row["splice_s"] = statistics.median(r["engine"]["splice_s"])
                parts = splice_parts(engine, bundle, device, r["engine"]["spliced_tokens"][0], reps)
                row["splice_parts_s"] = parts
                row["splice_ratio"] = row["splice_s"] / parts
            if name.startswith("plain"):
                decode_rows.append(decode_row(shape, bundle, engine, device, bw))
            rows.append(row)
            print(f"  {shape} {name}: engine {row['engine_p50_s']:.3f}s, reference {row['reference_p50_s']:.3f}s, "
                  f"x{row['speedup']:.1f}; with device images {row['engine_device_p50_s']:.3f}s")
        del bundles

    md = "### End to end (p50 latency, same run)\n\n" + table(rows, [
        ("shape", "shape"), ("scenario", "scenario"), ("batch", "B"), ("reference_p50_s", "reference p50 s"),
        ("reference_p90_s", "ref p90 s"), ("engine_p50_s", "engine p50 s"), ("engine_p90_s", "engine p90 s"),
        ("speedup", "speed-up"), ("engine_device_p50_s", "engine, device images p50 s"),
        ("speedup_device", "speed-up, device images"), ("engine_req_per_s", "engine req/s"), ("reference_req_per_s", "ref req/s"),
        ("engine_tok_per_s", "engine tok/s"), ("engine_peak_gib", "engine peak GiB"),
        ("reference_peak_gib", "ref peak GiB")])
    splice = [r for r in rows if "splice_s" in r]
    if splice:
        md += "\n\n### Splice (round end -> segment in the cache) vs its parts\n\n" + table(splice, [
            ("shape", "shape"), ("splice_s", "splice s"), ("splice_parts_s", "vision + prefill s"),
            ("splice_ratio", "ratio")])
    md += "\n\n### Decode at B=1 vs the bandwidth floor\n\n" + table(decode_rows, DECODE_COLUMNS)
    md += f"\n\nCopy bandwidth measured: {bw / 1e12:.3f} TB/s (read + write)."
    all_rows = rows + [dict(kind="decode", **r) for r in decode_rows]
    js, mdp = write_results("e2e", env, all_rows, md)
    png = mdp.with_suffix(".png")
    plot(rows, decode_rows, png, env["card"])
    print(md)
    print(f"wrote {js}, {mdp}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
