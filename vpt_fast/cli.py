"""`vpt-fast run | eval | serve | make-tiny`: answer questions about images with a VPT model.

Exit status: 0 when every request was answered, 1 when a request failed (finish reason
`error` or `no_room`) or the model could not be loaded (`serve`: or its engine died of a
device failure, so that a supervisor restarts it), 2 for a usage error. Errors are
one line on stderr; `--debug` adds the traceback. `eval` exits 0 once every item has a
row, error rows included (they are counted in its summary).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from .chat import question_prompt
from .prompt import script_ids

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DEMO_FORCE = "<|region_token_start|><|x_2|><|y_3|><|x_5|><|y_5|><|region_token_end|><|im_end|>"
FAILED = ("error", "no_room")  # finish reasons of requests that got no answer
MAX_SEQ_LEN_HELP = "the most tokens one request holds (default: 4096, or the model's max_position_embeddings if smaller)"


def say_warmup(engine) -> None:
    """One line on stderr when the engine captured its decode graphs at build."""
    capture = engine.graph_capture
    if capture is not None:
        print(f"captured decode graphs for batch sizes up to {capture.buckets[-1]} in {capture.seconds:.1f} s "
              f"({capture.bytes / 2**20:.0f} MiB)", file=sys.stderr)


def _images(parser: argparse.ArgumentParser, path: str) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        if not found:
            parser.error(f"--image: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {p}")
        return found
    if not p.exists():
        parser.error(f"--image: {p} does not exist")
    return [p]


def _trace_paths(parser: argparse.ArgumentParser, option: str | None, images: list[Path]) -> list[Path | None]:
    """Where each image's trace picture goes: always PNG, one distinct file per image."""
    if option is None:
        return [None] * len(images)
    out = Path(option)
    if out.suffix == "":
        out = out.with_suffix(".png")
    if out.suffix.lower() != ".png":
        parser.error(f"--trace-image must name a .png file (trace pictures are PNG), got {option}")
    if out.is_dir():
        parser.error(f"--trace-image {option} is a folder; give a file name such as {out / 'trace.png'}")
    if len(images) == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{image.name.replace('.', '_')}.png") for image in images]


def _looked_at(result, pipeline: str) -> tuple[list, list[str]]:
    """(traces, lines) of what a result's model looked at, from either pipeline."""
    from .engine import PerceptionTrace
    from .picture import describe

    if pipeline == "engine":
        traces = list(result.trace)
        lines = []
        for t in traces:
            lines.append(f"looked at {describe(t)}")
            lines.append(f"  {t.tokens_spliced} tokens spliced into the cache, {t.tokens_rolled_back} rolled back, "
                         f"{t.seconds * 1e3:.1f} ms")
    else:
        traces = []
        if result.round2_prompt_ids is not None:
            p = result.perception
            cells = [b.cells for b in p.blocks] if p.kind == "region" else []
            traces = [PerceptionTrace(p.kind, cells, list(result.boxes), 0, 0, 0.0)]
        lines = [f"looked at {describe(t)} (round 2 re-read {len(result.round2_prompt_ids)} tokens)" for t in traces]
    if not traces:
        kind = result.perception.kind if result.perception is not None else "none"
        why = {"none": "the model answered directly", "several": "round 1 asked for several kinds; its text is the answer",
               "malformed": "round 1 named a region block with no x or no y cell"}.get(kind, "")
        lines.append("looked at nothing more" + (f" ({why})" if why else ""))
    return traces, lines


def cmd_run(args) -> int:
    from tqdm import tqdm

    from .checkpoint import load_vpt_checkpoint
    from .picture import readable, trace_picture

    parser = args.parser
    images = _images(parser, args.image)
    traces_out = _trace_paths(parser, args.trace_image, images)
    if not args.question.strip():
        parser.error("--question is empty")
    device, args.dtype = _placement(parser, args.device, args.dtype)
    force = args.force
    if args.model is None:
        from .tiny import demo_checkpoint

        model_path = demo_checkpoint("region")
        print("No --model given: using a tiny RANDOM checkpoint (kept in {}). Its answers are noise;".format(model_path))
        print("a region selection is scripted so the whole perception path runs.\n")
        force = force or DEMO_FORCE
    else:
        model_path = Path(args.model)
        if not model_path.is_dir():
            parser.error(f"--model: {model_path} is not a checkpoint folder")
    bundle = load_vpt_checkpoint(model_path, dtype=args.dtype, device=device)
    forced = script_ids(bundle.tokenizer, force) if force else None
    prompt = question_prompt(args.question, args.mode)
    if args.pipeline == "engine":
        from .engine import Engine

        try:
            engine = Engine(bundle, max_seq_len=args.max_seq_len, **_cache_options(args))
        except ValueError as e:
            parser.error(f"--max-seq-len: {e}")
        say_warmup(engine)
        run = lambda chunk, n: engine.generate(chunk, [prompt] * n, args.max_new_tokens, [forced] * n)
    else:
        from .reference import two_round_generate

        run = lambda chunk, n: two_round_generate(bundle, chunk, [prompt] * n, args.max_new_tokens, [forced] * n)
    results = []
    batches = range(0, len(images), args.batch_size)
    for start in tqdm(batches, desc="batches", disable=len(images) == 1):
        chunk = images[start : start + args.batch_size]
        results += run(chunk, len(chunk))
    failed = 0
    for path, r, out in zip(images, results, traces_out):
        print(f"== {path}")
        error = getattr(r, "error", None)
        if r.finish_reason in FAILED:
            failed += 1
            print(f"failed ({r.finish_reason}): {readable(error or '')}")
        print(f"round 1: {readable(bundle.tokenizer.decode(r.round1_ids, skip_special_tokens=False))}")
        traces, lines = _looked_at(r, args.pipeline)
        for line in lines:
            print(line)
        if error and r.finish_reason not in FAILED:
            print(f"note: {readable(error)}")
        print(f"answer ({r.finish_reason}): {readable(r.text)}")
        if out is not None and r.finish_reason != "error":
            out.parent.mkdir(parents=True, exist_ok=True)
            trace_picture(path, traces, args.question, r.text, r.finish_reason).save(out, format="PNG")
            print(f"trace picture: {out}")
    if failed:
        print(f"vpt-fast: {failed} of {len(results)} request(s) failed", file=sys.stderr)
        return 1
    return 0


def cmd_eval(args) -> int:
    parser = args.parser
    data = Path(args.data)
    if not data.is_file():
        parser.error(f"DATA: {data} is not a file")
    out = Path(args.out)
    if out.is_dir():
        parser.error(f"--out: {out} is a folder; give a file such as {out / 'results.jsonl'}")
    if not out.parent.is_dir():
        parser.error(f"--out: the folder {out.parent} does not exist")
    if out.resolve() == data.resolve():
        parser.error("--out must not be the input file")
    model, force = _model(parser, args.model), args.force
    if model is None:
        print("No --model given: using a tiny RANDOM checkpoint. Its answers are noise; a region selection is "
              "scripted so the whole perception path runs.\n")
        force = force or DEMO_FORCE
    if args.ray is None:
        from .checkpoint import load_vpt_checkpoint
        from .engine import Engine
        from .eval import evaluate
        from .tiny import demo_checkpoint

        if args.workers != 1 or args.gpus_per_worker is not None:
            parser.error("--workers and --gpus-per-worker need --ray")
        device, dtype = _placement(parser, args.device, args.dtype)
        bundle = load_vpt_checkpoint(model or demo_checkpoint("region"), dtype=dtype, device=device)
        try:
            engine = Engine(bundle, max_seq_len=args.max_seq_len, max_batch_size=args.batch_size,
                            **_cache_options(args))
        except ValueError as e:
            parser.error(f"--max-seq-len: {e}")
        say_warmup(engine)
        summary = evaluate(data, out, engine, mode=args.mode, batch_size=args.batch_size, limit=args.limit,
                           max_new_tokens=args.max_new_tokens, force=force, retry_errors=args.retry_errors)
    else:
        _needs(parser, "ray", "the ray extra: pip install 'vpt_fast[ray]'")
        from .scale_out import evaluate_with_ray

        summary = evaluate_with_ray(data, out, model=model, address=args.ray or None, workers=args.workers,
                                    gpus_per_worker=args.gpus_per_worker, mode=args.mode, batch_size=args.batch_size, limit=args.limit,
                                    max_new_tokens=args.max_new_tokens, force=force, retry_errors=args.retry_errors,
                                    engine_options={"max_seq_len": args.max_seq_len,
                                                    "max_batch_size": args.batch_size, **_cache_options(args)},
                                    device=args.device, dtype=args.dtype)
    print(summary.text())
    print(f"results: {out}")
    return 0


def cmd_serve(args) -> int:
    parser = args.parser
    _needs(parser, "fastapi", "the serve extra: pip install 'vpt_fast[serve]'")
    _needs(parser, "prometheus_client", "the serve extra: pip install 'vpt_fast[serve]'")
    _needs(parser, "uvicorn", "the serve extra: pip install 'vpt_fast[serve]'")
    args.model = _model(parser, args.model)
    if args.allowed_local_media_path is not None:
        if not Path(args.allowed_local_media_path).is_dir():
            parser.error(f"--allowed-local-media-path: {args.allowed_local_media_path} is not a folder")
        args.allowed_local_media_path = str(Path(args.allowed_local_media_path).resolve())
    if args.ray is None:
        if args.replicas is not None or args.gpus_per_replica is not None or args.max_replicas is not None:
            parser.error("--replicas, --gpus-per-replica and --max-replicas need --ray")
        args.device, args.dtype = _placement(parser, args.device, args.dtype)
        from .serving.server import serve

        return serve(args)
    _needs(parser, "ray.serve", "the ray extra: pip install 'vpt_fast[ray]'")
    from .scale_out import SERVE_OPTIONS, serve_with_ray

    replicas = args.replicas or 1
    if args.max_replicas is not None and args.max_replicas < replicas:
        parser.error(f"--max-replicas ({args.max_replicas}) must be at least --replicas ({replicas})")
    options = {name: getattr(args, name) for name in SERVE_OPTIONS}
    serve_with_ray(options, address=args.ray or None, host=args.host, port=args.port, replicas=replicas,
                   gpus_per_replica=args.gpus_per_replica, max_replicas=args.max_replicas)
    return 0


def cmd_make_tiny(args) -> int:
    from .tiny import make_tiny_checkpoint

    folder = make_tiny_checkpoint(args.out, args.variant, seed=args.seed)
    print(f"wrote a tiny random {args.variant} checkpoint to {folder}")
    return 0


def _cache_options(args) -> dict:
    """The Engine's cache options from `--[no-]enable-prefix-caching` and `--encoder-cache-gib`."""
    return {"enable_prefix_caching": args.enable_prefix_caching, "encoder_cache_gib": args.encoder_cache_gib}


def _add_cache_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                         help="reuse the KV cache of a conversation prefix already computed, images included "
                              "(default: on; --no-enable-prefix-caching turns it off)")
    command.add_argument("--encoder-cache-gib", type=_at_least(0, float), default=None,
                         help="memory for vision-encoder outputs kept by image (default: room for 4 images of the "
                              "largest size per request of a full batch; 0 turns it off)")


def _placement(parser: argparse.ArgumentParser, device: str | None, dtype: str | None):
    """(torch device, dtype name) of --device and --dtype (see `checkpoint.placement`)."""
    from .checkpoint import placement

    try:
        return placement(device, dtype)
    except ValueError as e:
        parser.error(f"--device: {e}")


def _model(parser: argparse.ArgumentParser, model: str | None) -> str | None:
    """--model as an absolute path (Ray workers may run elsewhere), after checking it is a folder."""
    if model is None:
        return None
    if not Path(model).is_dir():
        parser.error(f"--model: {model} is not a checkpoint folder")
    return str(Path(model).resolve())


def _needs(parser: argparse.ArgumentParser, module: str, what: str) -> None:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as e:
        parser.error(f"this needs {what} ({e})")


def _at_least(low, kind=int):
    """An argparse type: a number of `kind` (int or float) no smaller than `low`."""
    what = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} >= {low}"
    return parse


def _image_limit(text: str) -> int:
    """An argparse type: vLLM's --limit-mm-per-prompt for images, `image=N` or `{"image": N}`
    (a bare N too); the server takes no other modality."""
    import json

    try:
        given = json.loads(text) if text.lstrip().startswith("{") else \
            dict(part.split("=", 1) for part in text.split(",")) if "=" in text else {"image": text}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected image=N or '{{\"image\": N}}', got {text!r}") from None
    if not isinstance(given, dict) or set(given) != {"image"}:
        raise argparse.ArgumentTypeError(f"only images have a limit here (image=N), got {text!r}")
    value = given["image"]
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
        raise argparse.ArgumentTypeError(f"the image limit must be an integer >= 0, got {value!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vpt-fast", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="answer a question about an image (or a folder of images)")
    run.add_argument("--image", required=True, help="an image file, or a folder of images run as a batch")
    run.add_argument("--question", required=True)
    run.add_argument("--model", help="a VPT checkpoint folder (default: a tiny random one, built once and kept)")
    run.add_argument("--mode", choices=["region", "reencode", "free"], default="free",
                     help="add the trigger sentence of the prompted models")
    run.add_argument("--force", help="round-1 tokens to script, as text (e.g. '<|clip_action_start|>...')")
    run.add_argument("--trace-image", metavar="OUT.png",
                     help="save a picture of what the model looked at (for a folder: OUT_<image name>.png each)")
    run.add_argument("--max-new-tokens", type=_at_least(1), default=64)
    run.add_argument("--batch-size", type=_at_least(1), default=8)
    run.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    run.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                     help="default: bfloat16 on a GPU, float32 on the CPU")
    run.add_argument("--max-seq-len", type=_at_least(2), default=None, help=MAX_SEQ_LEN_HELP)
    run.add_argument("--pipeline", choices=["engine", "reference"], default="engine",
                     help="single-pass engine, or the two-round reference flow (slow, for comparison)")
    _add_cache_options(run)
    run.set_defaults(func=cmd_run, parser=run)
    ev = sub.add_parser("eval", help="answer a JSONL dataset of questions about images, resumably (locally or on Ray)",
                        description="Each DATA line is {\"id\", \"image\", \"question\", \"answer\"?} (image: a path "
                                    "relative to DATA's folder, or a data: URL); each RESULTS line is {\"id\", "
                                    "\"prediction\", \"finish_reason\", \"trace\", \"correct\"?, \"error\"?}. Ids "
                                    "already in RESULTS are skipped, so an interrupted run resumes where it stopped.")
    ev.add_argument("data", metavar="DATA.jsonl")
    ev.add_argument("--out", required=True, metavar="RESULTS.jsonl", help="appended to; created when missing")
    ev.add_argument("--model", help="a VPT checkpoint folder (default: a tiny random one, built once and kept)")
    ev.add_argument("--mode", choices=["region", "reencode", "free"], default="free",
                    help="add the trigger sentence of the prompted models")
    ev.add_argument("--force", help="round-1 tokens to script for every item, as text")
    ev.add_argument("--batch-size", type=_at_least(1), default=8, help="items per engine batch (and per write)")
    ev.add_argument("--limit", type=_at_least(1), default=None, help="only the first N items of DATA")
    ev.add_argument("--max-new-tokens", type=_at_least(1), default=64)
    ev.add_argument("--max-seq-len", type=_at_least(2), default=None, help=MAX_SEQ_LEN_HELP)
    ev.add_argument("--retry-errors", action="store_true", help="ask again the items whose RESULTS rows are errors")
    ev.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available; on Ray: "
                    "cuda in each worker that has a GPU)")
    ev.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="default: bfloat16 on a GPU, float32 on the CPU")
    ev.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                    help="run on Ray: alone, the cluster RAY_ADDRESS names or a new one on this machine; 'auto' for "
                         "the cluster this machine is in; or the head's address (needs vpt_fast[ray])")
    ev.add_argument("--workers", type=_at_least(1), default=1, help="Ray actors, one engine each")
    ev.add_argument("--gpus-per-worker", type=_at_least(0, float), default=None,
                    help="GPUs per actor (default: 1 where the cluster has GPUs, else 0)")
    _add_cache_options(ev)
    ev.set_defaults(func=cmd_eval, parser=ev)
    serve = sub.add_parser("serve", help="serve the OpenAI chat-completions protocol (needs vpt_fast[serve])")
    serve.add_argument("--model", help="a VPT or Qwen2-VL checkpoint folder (default: the tiny random demo one)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_at_least(1), default=8000)
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    serve.add_argument("--served-model-name", help="the model name clients use (default: the folder's name)")
    serve.add_argument("--allowed-local-media-path", metavar="DIR", help="accept file:// image URLs inside DIR")
    serve.add_argument("--max-image-bytes", type=_at_least(1), default=20 * 2**20)
    serve.add_argument("--max-image-pixels", type=_at_least(1), default=64_000_000)
    serve.add_argument("--max-queue", type=_at_least(1), default=1024, help="requests waiting before 429s")
    serve.add_argument("--limit-mm-per-prompt", type=_image_limit, default=8, metavar="image=N",
                       help="the most images one request may carry, past it a 400 (vLLM's option: image=N or "
                            "'{\"image\": N}'; default 8)")
    serve.add_argument("--max-request-bytes", type=_at_least(1), default=None,
                       help="a request body over it is refused with 413 while it is read (default: the image byte "
                            "limit as base64, plus 1 MiB; it bounds a request's images together)")
    serve.add_argument("--max-connections", type=_at_least(1), default=1024,
                       help="open connections at once; past it uvicorn answers 503")
    serve.add_argument("--header-timeout", type=_at_least(0.1, float), default=10.0,
                       help="seconds a connection has to send a request's line and headers")
    serve.add_argument("--protect-metrics", action="store_true", help="put /metrics behind the API key too")
    serve.add_argument("--max-batch-size", type=_at_least(1), default=32)
    serve.add_argument("--max-seq-len", type=_at_least(2), default=None, help=MAX_SEQ_LEN_HELP)
    serve.add_argument("--max-num-batched-tokens", type=_at_least(1), default=None,
                       help="the most tokens one engine step computes; longer prefills are chunked (vLLM's option; "
                            "default: the engine's, 2048)")
    serve.add_argument("--kv-cache-gib", type=float, default=None, help="KV cache size (default: the engine's)")
    _add_cache_options(serve)
    serve.add_argument("--default-max-tokens", type=_at_least(1), default=256,
                       help="the token limit of a round when a request gives none")
    serve.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    serve.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="default: bfloat16 on a GPU, float32 on the CPU")
    serve.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="deploy on Ray Serve (needs vpt_fast[ray]): alone, the cluster RAY_ADDRESS names or a new "
                            "one on this machine; 'auto' for the cluster this machine is in; or the head's address")
    serve.add_argument("--replicas", type=_at_least(1), default=None, help="Ray Serve replicas (default 1)")
    serve.add_argument("--gpus-per-replica", type=_at_least(0, float), default=None,
                       help="GPUs per replica (default: 1 where the cluster has GPUs, else 0)")
    serve.add_argument("--max-replicas", type=_at_least(1), default=None,
                       help="autoscale between --replicas and this on ongoing requests per replica")
    serve.set_defaults(func=cmd_serve, parser=serve)
    tiny = sub.add_parser("make-tiny", help="write a tiny random VPT checkpoint in the released format")
    tiny.add_argument("out")
    tiny.add_argument("--variant", choices=["region", "clip", "dino", "sam", "plain"], default="region",
                      help="a VPT checkpoint with that perception, or plain: a stock Qwen2-VL one")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_make_tiny, parser=tiny)
    for p in (run, ev, serve, tiny):
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from . import _hf_compat

    _hf_compat.quiet_transformers()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("vpt-fast: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        else:
            print(f"vpt-fast: error: {e}" if str(e) else f"vpt-fast: error: {type(e).__name__}", file=sys.stderr)
            print("(run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
