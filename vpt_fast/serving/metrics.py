"""Prometheus metrics of one server (a registry of its own, so several servers in a process
do not collide): requests by finish reason, tokens, perceptions by kind, queue depth,
running requests, KV blocks in use, time to first token and time per output token, and the
engine's counters (preemptions, recomputed, prompt and spliced tokens prefilled, prefix and
encoder cache queries and hits)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from ..engine import AsyncEngine, GenerationResult

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class _EngineCounters:
    """The engine's own counters (`Engine.stats()`), read when /metrics is scraped; those with a
    vLLM equivalent under vLLM's name (prefix_cache_*, mm_cache_*)."""

    NAMES = {"preemptions": ("vpt_fast_engine_preemptions", "Requests preempted (and recomputed later)"),
             "recomputed_tokens": ("vpt_fast_engine_recomputed_tokens", "Tokens prefilled again after a preemption"),
             "computed_prompt_tokens": ("vpt_fast_engine_computed_prompt_tokens", "Prompt tokens prefilled"),
             "cached_prompt_tokens": ("vpt_fast_engine_cached_prompt_tokens",
                                      "Prompt tokens found in the prefix cache at their request's first admission"),
             "spliced_tokens": ("vpt_fast_engine_spliced_tokens", "Tokens of perception segments prefilled"),
             "prefix_cache_queries": ("vpt_fast_prefix_cache_queries",
                                      "Prefix cache queries, in tokens (every admission, recomputations included)"),
             "prefix_cache_hits": ("vpt_fast_prefix_cache_hits", "Prefix cache hits, in tokens"),
             "vision_cache_queries": ("vpt_fast_mm_cache_queries",
                                      "Encoder cache lookups, in images (first images, crops, branch inputs)"),
             "vision_cache_hits": ("vpt_fast_mm_cache_hits", "Encoder cache hits, in images"),
             "vision_encoder_images": ("vpt_fast_engine_vision_encoder_images",
                                       "Images, crops and branch inputs actually encoded")}

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        for key, (name, help_text) in self.NAMES.items():
            family = CounterMetricFamily(name, help_text)
            family.add_metric([], stats[key])
            yield family


class ServerMetrics:
    def __init__(self, engine: AsyncEngine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("vpt_fast_requests", "Finished requests", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("vpt_fast_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("vpt_fast_generation_tokens", "Tokens generated", registry=r)
        self.spliced_tokens = Counter("vpt_fast_spliced_tokens", "Tokens spliced into the cache by perceptions",
                                      registry=r)
        self.perceptions = Counter("vpt_fast_perceptions", "Perceptions made", ["kind"], registry=r)
        self.ttft = Histogram("vpt_fast_time_to_first_token_seconds", "From the request's arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("vpt_fast_time_per_output_token_seconds", "Between a request's first and last tokens, "
                              "per token", buckets=TOKEN_BUCKETS, registry=r)
        core = engine.engine
        Gauge("vpt_fast_queue_depth", "Requests waiting to run", registry=r).set_function(engine.queue_depth)
        Gauge("vpt_fast_running_requests", "Requests running", registry=r).set_function(lambda: core.num_running)
        Gauge("vpt_fast_kv_blocks_used", "KV cache blocks in use", registry=r).set_function(lambda: core.kv_blocks_used)
        Gauge("vpt_fast_kv_blocks_total", "KV cache blocks", registry=r).set_function(lambda: core.kv_blocks_total)
        r.register(_EngineCounters(core))

    def finished(self, results: GenerationResult | list[GenerationResult], first_token_s: float | None,
                 last_token_s: float | None) -> None:
        """Count a finished request (its answers, when it asked for n); times in seconds from its
        arrival."""
        answers = results if isinstance(results, list) else [results]
        result = answers[0]
        self.requests.labels(result.finish_reason).inc()
        self.prompt_tokens.inc(result.prompt_tokens)
        generated = sum(len(r.token_ids) for r in answers)
        self.generation_tokens.inc(generated)
        for t in (t for r in answers for t in r.trace):
            self.perceptions.labels(t.kind).inc()
            self.spliced_tokens.inc(t.tokens_spliced)
        if first_token_s is not None:
            self.ttft.observe(first_token_s)
            steps = max(len(r.token_ids) for r in answers)  # answers decode side by side
            if last_token_s is not None and steps > 1:
                self.tpot.observe((last_token_s - first_token_s) / (steps - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
