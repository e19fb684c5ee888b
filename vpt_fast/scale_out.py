"""Many GPUs and nodes through Ray (`pip install 'vpt_fast[ray]'`): dataset evaluation with
Ray Data, the OpenAI-compatible server as replicas with Ray Serve. Ray is imported here only
inside the functions that use it; nothing else in the package imports this module.

Evaluation: `evaluate_with_ray` reads the JSONL here (so that a malformed line still becomes
an error row, and the ids already answered are left out), then sends the items through
`ray.data.from_items(...).map_batches(RayWorker, compute=ActorPoolStrategy(size=workers),
num_gpus=gpus_per_worker)`: every actor loads the model once on its own device and answers
whole batches with `eval.Answerer`, the code local evaluation runs. The rows come back in
input order and are appended here batch by batch, so RESULTS.jsonl is the same file
`vpt-fast eval` writes locally. Images named by path are opened by the actors: on a cluster
of several machines the dataset's folder (and the checkpoint) must be at the same path on
every node.

Serving: `serve_with_ray` deploys `vpt_fast.serving.build_app` in each of N replicas (one
engine and num_gpus each) behind Ray Serve's HTTP proxy, the routes and answers of
`vpt-fast serve`; every response carries an `x-vpt-fast-replica` header naming the replica.
With max_replicas above N, Serve adds replicas while the average of ongoing requests per
replica stays above the engine's batch size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from types import SimpleNamespace
from typing import Any

from .eval import Answerer, Item, Summary, pending, write_rows

APP_NAME = "vpt-fast"


def _engine(model: str | None, engine_options: dict[str, Any], device: str | None, dtype: str | None):
    """An engine on this process's device: the `device` given, else cuda when this process
    sees a GPU (in a Ray actor: the ones Ray gave it), else the CPU."""
    from .checkpoint import load_vpt_checkpoint, placement
    from .engine import Engine
    from .tiny import demo_checkpoint

    device, dtype = placement(device, dtype)
    bundle = load_vpt_checkpoint(model or demo_checkpoint("region"), dtype=dtype, device=device)
    return Engine(bundle, **engine_options)


def _where() -> dict[str, str]:
    """Which node, process and GPUs this is (the node id is Ray's when Ray runs this)."""
    node = "local"
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return {"node": node, "pid": str(os.getpid()), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}


class RayWorker:
    """A Ray Data actor: one engine, loaded once, answering batches of items.

    Takes batches {"item": [JSON of an `eval.Item`, ...]} and returns {"row": [JSON of its
    output row, ...], "worker": [JSON of where it ran, ...]}. It needs no Ray itself, so it can
    be checked on a machine without Ray."""

    def __init__(self, model: str | None = None, engine_options: dict[str, Any] | None = None, mode: str | None = None,
                 max_new_tokens: int = 64, force: str | None = None, device: str | None = None,
                 dtype: str | None = None):
        engine = _engine(model, dict(engine_options or {}), device, dtype)
        self.answerer = Answerer(engine, mode, max_new_tokens, force)
        self.where = json.dumps(_where())

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        items = [Item(**json.loads(text)) for text in batch["item"]]
        rows = self.answerer.rows(items)
        return {"row": [json.dumps(row, ensure_ascii=False) for row in rows], "worker": [self.where] * len(rows)}


class ClusterTooSmall(RuntimeError):
    """The Ray cluster cannot hold the actors asked for."""


def actors_that_fit(nodes: list[dict[str, float]], gpus: float, cpus: float) -> int:
    """How many actors of `gpus` GPUs and `cpus` CPUs each the nodes (each a dict of its total
    resources, Ray's "GPU" and "CPU") hold at once; an actor lives on one node."""
    fit = 0
    for node in nodes:
        counts = [int(node.get(name, 0.0) // need + 1e-9) for name, need in (("GPU", gpus), ("CPU", cpus)) if need > 0]
        fit += min(counts) if counts else 10**9
    return fit


def plan_actors(what: str, count: int, gpus: float | None, cpus: float,
                nodes: list[dict[str, float]] | None = None) -> float:
    """The GPUs each of `count` actors gets, checked against the cluster before any starts.

    gpus None: 1 where some node has a GPU, else 0 (CPU actors, said in one line). Raises
    ClusterTooSmall at once, naming what was asked and what the cluster has, when the actors
    cannot all be placed (rather than waiting for a start timeout). nodes: each alive node's
    total resources (default: the connected cluster's)."""
    if nodes is None:
        import ray

        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    have_gpus = sum(n.get("GPU", 0.0) for n in nodes)
    if gpus is None:
        if have_gpus == 0:
            print(f"the Ray cluster has no GPU: {count} {what}(s) run on the CPU", flush=True)
        gpus = 1.0 if have_gpus > 0 else 0.0
    fit = actors_that_fit(nodes, gpus, cpus)
    if fit < count:
        layout = ", ".join(f"{n.get('GPU', 0.0):g} GPU/{n.get('CPU', 0.0):g} CPU" for n in nodes) or "no node"
        raise ClusterTooSmall(f"{count} {what}(s) of {gpus:g} GPU(s) and {cpus:g} CPU(s) each were asked for; the Ray "
                              f"cluster holds {fit} such: {len(nodes)} node(s) ({layout}), {have_gpus:g} GPU(s) in all")
    return gpus


def connect(address: str | None) -> None:
    """Join the Ray cluster at `address` ("auto": the one this machine belongs to; None: the
    one RAY_ADDRESS names, else a new one on this machine), unless this process already has."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)


def evaluate_with_ray(data: str | os.PathLike, out: str | os.PathLike, *, model: str | None = None,
                      address: str | None = None, workers: int = 1, gpus_per_worker: float | None = None,
                      cpus_per_worker: float = 1.0, mode: str | None = None, batch_size: int = 8,
                      limit: int | None = None, max_new_tokens: int = 64, force: str | None = None,
                      retry_errors: bool = False, engine_options: dict[str, Any] | None = None,
                      device: str | None = None, dtype: str | None = None, ray_options: dict[str, Any] | None = None,
                      start_timeout: float = 600.0, progress: bool = True) -> Summary:
    """`eval.evaluate` over `workers` Ray actors (gpus_per_worker GPUs each, 0 for none; None:
    1 where the cluster has GPUs, else 0). A pool the cluster cannot hold raises
    ClusterTooSmall before any actor starts (see `plan_actors`).

    engine_options: `Engine` arguments of every actor's engine; device / dtype: as
    `load_vpt_checkpoint` takes them (default: see `RayWorker`); ray_options: more Ray
    options of each actor, e.g. {"label_selector": {...}} or {"resources": {...}} to choose
    its nodes, {"accelerator_type": "H100"}; start_timeout: seconds to wait for every actor
    to start (and load its model) before failing with what the cluster lacks."""
    import ray
    from tqdm import tqdm

    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if (gpus_per_worker or 0) < 0 or cpus_per_worker < 0:
        raise ValueError(f"GPUs and CPUs per worker cannot be negative, got {gpus_per_worker} and {cpus_per_worker}")
    left = pending(data, out, limit, retry_errors)
    summary = Summary(skipped=left.done, repeated=left.repeated)
    if not left.items:
        return summary
    connect(address)
    gpus_per_worker = plan_actors("worker", workers, gpus_per_worker, cpus_per_worker)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    context.wait_for_min_actors_s = start_timeout  # every actor up before the first batch: an even spread
    dataset = ray.data.from_items([{"item": json.dumps(dataclasses.asdict(item))} for item in left.items])
    pool = ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=2)
    answered = dataset.map_batches(
        RayWorker, batch_size=batch_size, compute=pool,
        fn_constructor_kwargs=dict(model=model, engine_options=engine_options, mode=mode, max_new_tokens=max_new_tokens,
                                   force=force, device=device, dtype=dtype),
        num_gpus=gpus_per_worker or None, num_cpus=cpus_per_worker, udf_modifying_row_count=False,
        **(ray_options or {}))
    start = time.perf_counter()
    seen = set()
    with open(out, "a", encoding="utf-8") as f, tqdm(total=len(left.items), desc="items", disable=not progress) as bar:
        try:
            for batch in answered.iter_batches(batch_size=batch_size, batch_format="numpy"):
                write_rows(f, (json.loads(text) for text in batch["row"]), summary, bar)
                seen.update(str(w) for w in batch["worker"])
        except ray.exceptions.GetTimeoutError as e:
            have = ray.cluster_resources()
            raise RuntimeError(f"the {workers} worker(s) did not all start within {start_timeout} s: each asks for "
                               f"{gpus_per_worker} GPU(s) and {cpus_per_worker} CPU(s), the cluster has "
                               f"{have.get('GPU', 0):g} GPU(s) and {have.get('CPU', 0):g} CPU(s) in all") from e
    summary.seconds = time.perf_counter() - start
    summary.workers = [json.loads(w) for w in sorted(seen)]
    return summary


# ----------------------------------------------------------------------------- Ray Serve


SERVE_OPTIONS = ("model", "device", "dtype", "api_key", "served_model_name", "allowed_local_media_path",
                 "max_image_bytes", "max_image_pixels", "max_queue", "max_batch_size", "max_seq_len", "kv_cache_gib",
                 "default_max_tokens", "max_request_bytes", "protect_metrics", "max_num_batched_tokens",
                 "enable_prefix_caching", "encoder_cache_gib", "limit_mm_per_prompt")


class _Replica:
    """One Serve replica: an engine on the replica's device and the app of `vpt-fast serve`."""

    def __init__(self, options: dict[str, Any]):
        self.options = options

    def __serve_build_asgi_app__(self):
        from ray import serve

        from .checkpoint import placement
        from .serving.server import make_app

        args = SimpleNamespace(**self.options)
        args.device, args.dtype = placement(args.device, args.dtype)
        return make_app(args, replica_id=serve.get_replica_context().replica_tag)


def deployment(options: dict[str, Any], replicas: int = 1, gpus_per_replica: float = 1.0,
               max_replicas: int | None = None, cpus_per_replica: float = 1.0, ray_options: dict[str, Any] | None = None):
    """The Serve application of `vpt-fast serve --ray`: `options` are those of `vpt-fast serve`
    (the names in SERVE_OPTIONS; missing ones take the command's defaults); ray_options: more
    Ray actor options of each replica (e.g. {"resources": {...}})."""
    from ray import serve

    unknown = set(options) - set(SERVE_OPTIONS)
    if unknown:
        raise ValueError(f"unknown serve option(s) {sorted(unknown)}; expected some of {SERVE_OPTIONS}")
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    if max_replicas is not None and max_replicas < replicas:
        raise ValueError(f"max_replicas ({max_replicas}) must be at least replicas ({replicas})")
    from .cli import build_parser

    defaults = vars(build_parser().parse_args(["serve"]))  # `vpt-fast serve`'s own defaults
    full = {name: options.get(name, defaults[name]) for name in SERVE_OPTIONS}
    batch = full["max_batch_size"]
    scaling: dict[str, Any] = {"num_replicas": replicas}
    if max_replicas is not None and max_replicas > replicas:
        scaling = {"autoscaling_config": {"min_replicas": replicas, "max_replicas": max_replicas,
                                          "target_ongoing_requests": batch}}
    ingress = serve.ingress()(_Replica)
    app = serve.deployment(ingress, name="VptFastServer", max_ongoing_requests=2 * batch,
                           ray_actor_options={"num_gpus": gpus_per_replica, "num_cpus": cpus_per_replica,
                                              **(ray_options or {})},
                           **scaling)
    return app.bind(full)


def serve_with_ray(options: dict[str, Any], *, address: str | None = None, host: str = "127.0.0.1", port: int = 8000,
                   replicas: int = 1, gpus_per_replica: float | None = None, max_replicas: int | None = None,
                   cpus_per_replica: float = 1.0, ray_options: dict[str, Any] | None = None, blocking: bool = True) -> None:
    """Deploy the server on the Ray cluster at `address` (see `connect`) behind Serve's HTTP
    proxy at host:port; with blocking, wait until interrupted, then delete the deployment.
    gpus_per_replica None: 1 where the cluster has GPUs, else 0; replicas the cluster cannot
    hold raise ClusterTooSmall before anything is deployed."""
    from ray import serve

    connect(address)
    gpus_per_replica = plan_actors("replica", replicas, gpus_per_replica, cpus_per_replica)
    app = deployment(options, replicas, gpus_per_replica, max_replicas, cpus_per_replica, ray_options)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    if not blocking:
        return
    print(f"serving on http://{host}:{port}/v1 with {replicas} replica(s); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.delete(APP_NAME)
