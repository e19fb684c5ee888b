"""How a decode step's time grows with the batch: the engine's step against transformers' own
forward of the same weights, in the same run.

For each batch size B, B text requests run with long answers; the time of `Engine.step()` is
taken over steps that only decode (no admission, no request leaving), greedy and sampled
(top-k 50, top-p 0.9, a seed per request). The baseline is transformers' forward of one new
token per sequence over a DynamicCache of the same prompts (what a step of its generate runs
before its own sampling). The per-extra-request cost is the least-squares slope of the time
over B; on a GPU, where the model's own work barely grows with B at these sizes, it is the
host's work per request. The last columns replay the model's decode outputs instead of
computing them, so that on the CPU too they show the host's work (and the sampling) alone.

    python benchmarks/host_overhead.py --device cpu --threads 1        # the tiny model, one thread
    python benchmarks/host_overhead.py --shape 2b                      # a GPU, 2B shapes, bf16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, sync, table, write_results  # noqa: E402

from vpt_fast import SamplingParams  # noqa: E402
from vpt_fast.engine import Engine  # noqa: E402

PROMPT = "Describe the picture in one sentence, with every detail you can see."


def bundle_for(shape: str, device: torch.device):
    if shape == "tiny":
        from vpt_fast.checkpoint import load_vpt_checkpoint
        from vpt_fast.tiny import demo_checkpoint

        return load_vpt_checkpoint(demo_checkpoint("region"), device=device)
    from e2e import build_bundle

    return build_bundle(shape, "clip", torch.bfloat16, device)


def engine_step_ms(bundle, batch: int, sampled: bool, steps: int, host_only: bool = False) -> float:
    """Median ms of `Engine.step()` over steps where `batch` requests only decode. host_only: the
    model's decode step is replaced by its first outputs, replayed (the rest of the step, the
    sampler included, runs as it is): what is left is the host's work and the sampling."""
    engine = Engine(bundle, max_seq_len=1024, max_batch_size=batch, kv_cache_tokens=1024 * batch)
    device = engine.device
    if host_only:
        real, outputs = engine._decoder, {}

        def replayed(tokens, *rest):
            if len(tokens) not in outputs:
                outputs[len(tokens)] = real(tokens, *rest)
            return tuple(t.clone() for t in outputs[len(tokens)])

        engine._decoder = replayed
    n = 0

    def params():
        nonlocal n
        n += 1
        return SamplingParams(max_new_tokens=900, do_sample=True, top_k=50, top_p=0.9, seed=n) if sampled \
            else SamplingParams(max_new_tokens=900)

    times = []
    while len(times) < steps:
        while engine.num_running + engine.num_waiting < batch:
            engine.add_request(None, PROMPT, params())
        admitting = engine.num_waiting > 0 or any(r.pending > 1 for r in engine._running)
        sync(device)
        start = time.perf_counter()
        engine.step()
        sync(device)
        elapsed = time.perf_counter() - start
        if not admitting and engine.num_running == batch:
            times.append(elapsed)
    return 1e3 * statistics.median(times[2:] if len(times) > 4 else times)


@torch.no_grad()
def hf_forward_ms(bundle, batch: int, steps: int) -> float:
    """Median ms of transformers' forward of one token per sequence over a cache of the prompts."""
    from vpt_fast import _hf_compat
    from vpt_fast.prompt import conversation, encode

    model = bundle.model
    device = model.lm_head.weight.device
    ids = torch.tensor([encode(bundle.tokenizer, conversation([("user", PROMPT)]))] * batch, device=device)
    cache = _hf_compat.dynamic_cache(model.config.text_config)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    length = ids.shape[1]
    times = []
    for _ in range(steps):
        length += 1
        sync(device)
        start = time.perf_counter()
        out = model(input_ids=token, past_key_values=cache, use_cache=True,
                    attention_mask=torch.ones(batch, length, dtype=torch.long, device=device))
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[2:])


def slope(xs: list[int], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default="tiny", choices=["tiny", "2b", "7b"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None, help="torch threads on the CPU")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bundle = bundle_for(args.shape, device)
    rows = []
    for b in args.batches:
        row = {"batch": b, "hf_forward_ms": hf_forward_ms(bundle, b, args.steps),
               "step_greedy_ms": engine_step_ms(bundle, b, False, args.steps),
               "step_sampled_ms": engine_step_ms(bundle, b, True, args.steps),
               "host_greedy_ms": engine_step_ms(bundle, b, False, args.steps, host_only=True),
               "host_sampled_ms": engine_step_ms(bundle, b, True, args.steps, host_only=True)}
        row["greedy_vs_hf"] = row["step_greedy_ms"] / row["hf_forward_ms"]
        rows.append(row)
        print(row, flush=True)
    xs = [r["batch"] for r in rows]
    per = {k: 1e3 * slope(xs, [r[k] for r in rows]) if len(rows) > 1 else None
           for k in ("hf_forward_ms", "step_greedy_ms", "step_sampled_ms", "host_greedy_ms", "host_sampled_ms")}
    env = environment(device)
    env.update(shape=args.shape, per_extra_request_us=per)
    summary = (f"Per extra request (slope over B): transformers' forward {per['hf_forward_ms']:.1f} us, engine step "
               f"greedy {per['step_greedy_ms']:.1f} us, sampled {per['step_sampled_ms']:.1f} us; without the model's "
               f"step: greedy {per['host_greedy_ms']:.1f} us, sampled {per['host_sampled_ms']:.1f} us"
               if len(rows) > 1 else "")
    markdown = table(rows, [("batch", "B"), ("hf_forward_ms", "transformers forward (ms)"),
                            ("step_greedy_ms", "engine step, greedy (ms)"),
                            ("step_sampled_ms", "engine step, sampled (ms)"), ("greedy_vs_hf", "greedy / forward"),
                            ("host_greedy_ms", "without the model, greedy (ms)"),
                            ("host_sampled_ms", "without the model, sampled (ms)")])
    print(f"card: {env['card']}\n{markdown}\n{summary}")
    write_results(f"host_overhead_{args.shape}", env, rows, markdown + "\n\n" + summary)


if __name__ == "__main__":
    main()
