"""Serving under Poisson arrivals: continuous batching against static batching, in the same run.

A stream of mixed requests (a region perception, a clip re-encoding, plain generation, in
turn; answers of random lengths; a share of them, --repeated, asking another question about
an image sent before) arrives as a Poisson process at three rates. The same
engine serves it twice: continuously (requests join at every step, as `Engine.step` and
`AsyncEngine` do) and with static batching (a new batch starts only when the previous one
has finished, as `generate` over fixed batches does). Reported per rate and mode:
throughput (requests/s, tokens/s), time to first token p50/p90, time per output token
p50/p90 and peak GPU memory; and the time to first token of a lone request on an idle
engine. Continuous batching runs a third time on an engine with the prefix and encoder
caches off. The rates are fractions of the capacity measured first (requests/s of a burst of
max_batch_size requests arriving at once), so the highest keeps about max_batch_size
streams in flight.

With --http the same Poisson load also goes through the OpenAI-compatible server (started
in this process on 127.0.0.1, images sent as data: URLs, streamed, with the async `openai`
client), and the HTTP overhead per request (a lone request over HTTP against the same
request in process) is printed. It needs the serve extra and the openai package.

    python benchmarks/serving.py                     # GPU, 2B shapes, bf16
    python benchmarks/serving.py --quick             # GPU, fewer requests
    python benchmarks/serving.py --device cpu --quick --http
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, percentile, sync, table, write_results  # noqa: E402
from e2e import QUESTION, build_bundle, forced_ids, image  # noqa: E402

from vpt_fast import SamplingParams  # noqa: E402
from vpt_fast.engine import Engine, FinishEvent, TokenEvent  # noqa: E402

KINDS = ("region", "clip", "plain")
QUESTIONS = [QUESTION] + [QUESTION.replace("the color of the car", what) for what in (
    "the shape of the sign", "the person on the left holding", "the number on the door")]


@dataclass
class Arrival:
    at: float  # seconds after the start
    image: object
    forced: list[int] | None
    params: SamplingParams
    first_token: float | None = None
    done: float | None = None
    tokens: int = 0
    token_times: list[float] = field(default_factory=list)
    question: str = QUESTION


def workload(bundle, n: int, rate: float, answer: tuple[int, int], seed: int, repeated: float = 0.0) -> list[Arrival]:
    """n arrivals at `rate` a second; a share `repeated` of them about an image sent before
    (with another question), the others each about an image of its own."""
    rng = random.Random(seed)
    tok = bundle.tokenizer
    t, out, sent = 0.0, [], []
    for i in range(n):
        t += rng.expovariate(rate)
        kind = KINDS[i % 3]
        length = rng.randint(*answer)
        forced = forced_ids(tok, kind) if kind != "plain" else None
        if sent and rng.random() < repeated:
            picture = rng.choice(sent)
        else:
            picture = image(seed * 100_000 + i)
            sent.append(picture)
        out.append(Arrival(t, picture, forced, SamplingParams(max_new_tokens=length, answer_max_new_tokens=length),
                           question=rng.choice(QUESTIONS)))
    return out


def serve(engine: Engine, arrivals: list[Arrival], device, continuous: bool) -> float:
    """Run the arrivals through the engine; fills their times; returns the makespan in seconds."""
    pending = list(arrivals)
    by_id: dict[int, Arrival] = {}
    start = time.perf_counter()
    while pending or engine.has_unfinished():
        now = time.perf_counter() - start
        if continuous or not engine.has_unfinished():
            while pending and pending[0].at <= now and (continuous or engine.num_waiting < engine.max_batch_size):
                a = pending.pop(0)
                by_id[engine.add_request(a.image, a.question, a.params, a.forced)] = a
        if not engine.has_unfinished():
            time.sleep(max(0.0, pending[0].at - (time.perf_counter() - start)))
            continue
        events = engine.step()
        sync(device)
        t = time.perf_counter() - start
        for e in events:
            a = by_id[e.request]
            if isinstance(e, TokenEvent):
                a.first_token = a.first_token if a.first_token is not None else t
                a.tokens += 1
                a.token_times.append(t)
            elif isinstance(e, FinishEvent):
                a.done = t
                if e.result.finish_reason in ("error", "no_room"):  # (random weights may ask for any perception)
                    raise RuntimeError(f"a request ended with {e.result.finish_reason}: {e.result.error}")
    return max(a.done for a in arrivals) - arrivals[0].at


def summarize(arrivals: list[Arrival], makespan: float) -> dict:
    ttft = [a.first_token - a.at for a in arrivals]
    tpot = [(a.done - a.first_token) / (a.tokens - 1) for a in arrivals if a.tokens > 1]
    return dict(req_per_s=len(arrivals) / makespan, tok_per_s=sum(a.tokens for a in arrivals) / makespan,
                ttft_p50_s=statistics.median(ttft), ttft_p90_s=percentile(ttft, 90),
                tpot_p50_ms=statistics.median(tpot) * 1e3, tpot_p90_ms=percentile(tpot, 90) * 1e3)


def start_server(engine: Engine):
    """(base URL, uvicorn server, thread) of the OpenAI-compatible app over `engine`, in a thread."""
    import socket
    import threading

    import uvicorn

    from vpt_fast.engine import AsyncEngine
    from vpt_fast.serving.app import ServeConfig, build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(AsyncEngine(engine), ServeConfig(model_name="bench")),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}/v1", server, thread


def serve_http(base_url: str, bundle, arrivals: list[Arrival]) -> float:
    """Send the arrivals to the server as streamed chat completions; fills their times; the makespan."""
    import asyncio
    import base64
    import io

    from openai import AsyncOpenAI

    tok = bundle.tokenizer

    def url(image) -> str:
        buf = io.BytesIO()
        image.save(buf, "PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    async def one(client, a: Arrival, start: float):
        await asyncio.sleep(max(0.0, a.at - (time.perf_counter() - start)))
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url(a.image)}},
                                                 {"type": "text", "text": a.question.removeprefix("<image>")}]}]
        extra = {"vpt_force": tok.decode(a.forced, skip_special_tokens=False)} if a.forced else {}
        stream = await client.chat.completions.create(model="bench", messages=messages, temperature=0, stream=True,
                                                      max_tokens=a.params.max_new_tokens, extra_body=extra)
        async for chunk in stream:
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            if a.first_token is None and (choice.delta.content or "perception" in (choice.model_extra.get("vpt") or {})):
                a.first_token = time.perf_counter() - start
            if choice.finish_reason:
                a.tokens = len(choice.model_extra["vpt"]["token_ids"])
        a.done = time.perf_counter() - start
        a.first_token = a.done if a.first_token is None else a.first_token

    async def run():
        client = AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
        start = time.perf_counter()
        await asyncio.gather(*(one(client, a, start) for a in arrivals))
        await client.close()

    asyncio.run(run())
    return max(a.done for a in arrivals) - arrivals[0].at


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default=None, help="2b or 7b on a GPU (default 2b), tiny on the CPU")
    ap.add_argument("--quick", action="store_true", help="fewer requests per rate")
    ap.add_argument("--max-num-batched-tokens", type=lambda v: None if v == "none" else int(v), default=2048,
                    help="the engine's per-step token budget ('none': prefill whatever is due at once)")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--batch", type=int, default=32, help="max_batch_size of the engine (and of a static batch)")
    ap.add_argument("--rates", type=float, nargs=3, default=(0.25, 0.5, 1.0),
                    help="arrival rates as fractions of the estimated capacity")
    ap.add_argument("--http", action="store_true", help="also send the load through the OpenAI-compatible server")
    ap.add_argument("--repeated", type=float, default=0.5,
                    help="the share of requests about an image sent before (another question about it)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    shape = args.shape or ("2b" if gpu else "tiny")
    dtype = torch.bfloat16 if gpu else torch.float32
    n = args.requests or ((96 if args.quick else 256) if gpu else (24 if args.quick else 64))
    answer = (16, 128) if gpu else (4, 24)
    env = environment(device)
    bundle = build_bundle(shape, "clip", dtype, device)
    options = dict(max_seq_len=1024, max_batch_size=args.batch, kv_cache_tokens=1024 * args.batch,
                   max_num_batched_tokens=args.max_num_batched_tokens)
    engine = Engine(bundle, **options)
    uncached = Engine(bundle, **options, enable_prefix_caching=False, encoder_cache_gib=0)
    print(f"{env['card']}: {shape}, {n} requests per rate, answers of {answer[0]}-{answer[1]} tokens, batch {args.batch}")

    # a lone request on an idle engine (the latency floor), and a burst of a full batch arriving at once
    # (the capacity: requests/s with max_batch_size in flight)
    for warm in (engine, uncached):
        serve(warm, workload(bundle, 3, 1e6, answer, seed=98), device, continuous=True)  # warm up
    lone = workload(bundle, 1, 1.0, answer, seed=99)
    lone[0].at = 0.0
    lone_latency = serve(engine, lone, device, continuous=True)
    lone_ttft = lone[0].first_token
    burst = workload(bundle, args.batch, 1e9, answer, seed=97)
    capacity = args.batch / serve(engine, burst, device, continuous=True)
    print(f"lone request: first token {lone_ttft * 1e3:.1f} ms, {lone_latency:.3f} s for {lone[0].tokens} tokens; "
          f"a burst of {args.batch}: {capacity:.2f} requests/s")

    if args.http:
        base_url, server, thread = start_server(engine)
        requests = [workload(bundle, 1, 1.0, (16, 16), seed=90 + k) for k in range(6)]
        for request in requests:
            request[0].at = 0.0
        direct = statistics.median(serve(engine, r, device, continuous=True) for r in requests)
        for request in requests:
            request[0].first_token = request[0].done = None
        over_http = statistics.median(serve_http(base_url, bundle, r) for r in requests)
        print(f"HTTP overhead per request: {(over_http - direct) * 1e3:.1f} ms (a lone request, its 640x480 image "
              f"sent as a PNG data: URL: {over_http * 1e3:.1f} ms over HTTP, {direct * 1e3:.1f} ms in process)")

    rows = []
    for fraction in args.rates:
        rate = fraction * capacity
        row = dict(rate=rate, fraction=fraction)
        for mode in ("static", "continuous", "uncached"):
            arrivals = workload(bundle, n, rate, answer, seed=int(fraction * 1000), repeated=args.repeated)
            if gpu:
                torch.cuda.reset_peak_memory_stats(device)
            served = serve(uncached if mode == "uncached" else engine, arrivals, device, continuous=mode != "static")
            stats = summarize(arrivals, served)
            stats["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if gpu else None
            row.update({f"{mode}_{k}": v for k, v in stats.items()})
        if args.http:
            arrivals = workload(bundle, n, rate, answer, seed=int(fraction * 1000), repeated=args.repeated)
            stats = summarize(arrivals, serve_http(base_url, bundle, arrivals))
            row.update({f"http_{k}": v for k, v in stats.items()})
        row["throughput_ratio"] = row["continuous_req_per_s"] / row["static_req_per_s"]
        row["cache_ratio"] = row["continuous_req_per_s"] / row["uncached_req_per_s"]
        row["ttft_p90_vs_lone"] = row["continuous_ttft_p90_s"] / lone_ttft
        rows.append(row)
        print(f"  rate {rate:.2f}/s: continuous {row['continuous_req_per_s']:.2f} req/s, static "
              f"{row['static_req_per_s']:.2f} req/s (x{row['throughput_ratio']:.2f}); TTFT p90 "
              f"{row['continuous_ttft_p90_s'] * 1e3:.0f} ms vs static {row['static_ttft_p90_s'] * 1e3:.0f} ms "
              f"({row['ttft_p90_vs_lone']:.1f}x a lone request's); caches off {row['uncached_req_per_s']:.2f} req/s "
              f"(on: x{row['cache_ratio']:.2f}), TTFT p90 {row['uncached_ttft_p90_s'] * 1e3:.0f} ms")

    md = (f"### Serving, Poisson arrivals ({shape}, {n} requests a rate, region / clip / plain in turn, answers of "
          f"{answer[0]}-{answer[1]} tokens, batch {args.batch}, {args.repeated:.0%} of the requests about an image "
          f"sent before)\n\n"
          f"Lone request on an idle engine: first token {lone_ttft * 1e3:.1f} ms, {lone_latency:.3f} s in all.\n\n")
    md += table(rows, [("rate", "arrivals/s"), ("static_req_per_s", "static req/s"), ("continuous_req_per_s", "continuous req/s"),
                       ("throughput_ratio", "x static"), ("static_ttft_p50_s", "static TTFT p50 s"),
                       ("static_ttft_p90_s", "static TTFT p90 s"), ("continuous_ttft_p50_s", "TTFT p50 s"),
                       ("continuous_ttft_p90_s", "TTFT p90 s"), ("ttft_p90_vs_lone", "TTFT p90 / lone"),
                       ("static_tpot_p50_ms", "static TPOT p50 ms"), ("continuous_tpot_p50_ms", "TPOT p50 ms"),
                       ("continuous_tpot_p90_ms", "TPOT p90 ms"), ("continuous_tok_per_s", "tok/s"),
                       ("static_peak_gib", "static peak GiB"), ("continuous_peak_gib", "peak GiB")])
    md += ("\n\nContinuous batching with the prefix and encoder caches on (the default) against off, same "
           "arrivals:\n\n" + table(rows, [
               ("rate", "arrivals/s"), ("uncached_req_per_s", "off req/s"), ("continuous_req_per_s", "on req/s"),
               ("cache_ratio", "on / off"), ("uncached_ttft_p50_s", "off TTFT p50 s"),
               ("continuous_ttft_p50_s", "on TTFT p50 s"), ("uncached_ttft_p90_s", "off TTFT p90 s"),
               ("continuous_ttft_p90_s", "on TTFT p90 s")]))
    head = dict(lone_ttft_s=lone_ttft, lone_latency_s=lone_latency)
    if args.http:
        md += ("\n\nOver HTTP (the OpenAI-compatible server, streamed; first output = the first content or "
               "perception chunk):\n\n" + table(rows, [
                   ("rate", "arrivals/s"), ("http_req_per_s", "HTTP req/s"), ("continuous_req_per_s", "in-process req/s"),
                   ("http_ttft_p50_s", "HTTP first output p50 s"), ("http_ttft_p90_s", "HTTP first output p90 s"),
                   ("http_tpot_p50_ms", "HTTP TPOT p50 ms")]))
        md += (f"\n\nHTTP overhead per request (lone, median of 6; the client encodes the 640x480 image as a PNG "
               f"data: URL, the server decodes it): {(over_http - direct) * 1e3:.1f} ms.")
        head.update(http_overhead_s=over_http - direct)
        server.should_exit = True
        thread.join(timeout=60)
    js, mdp = write_results("serving", env, [head] + rows, md)
    print(md)
    print(f"wrote {js}, {mdp}")
    try:
        plot(rows, mdp.with_suffix(".png"), env["card"])
    except ImportError:
        print("matplotlib is not installed: no plot")
    return 0


def plot(rows, path: Path, card_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    rates = [r["rate"] for r in rows]
    for mode in ("static", "continuous"):
        axes[0].plot(rates, [r[f"{mode}_req_per_s"] for r in rows], "o-", label=mode)
        axes[1].plot(rates, [r[f"{mode}_ttft_p90_s"] for r in rows], "o-", label=mode)
    axes[0].set_xlabel("arrivals / s")
    axes[0].set_ylabel("completed requests / s")
    axes[1].set_xlabel("arrivals / s")
    axes[1].set_ylabel("time to first token p90 (s)")
    axes[0].legend()
    axes[0].set_title(f"Serving, {card_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
