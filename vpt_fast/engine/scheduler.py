"""The single-pass VPT engine: continuous batching over a paged KV cache.

Round 1 decodes as usual. When it ends, its output is parsed and the conversation the
two-round reference would read next is spliced into the request's sequence (see
`splice.py`); decoding goes on from there. The published model runs two inner passes at
every step; one suffices here because attention is causal: a control vector is the final
hidden state of the token before `<|X_action|>`, which the engine already has when it
feeds that token.

Requests join and leave at every step. One `step()`:
1. prefills what became due: perception segments spliced at the last step, then waiting
   requests (new ones, and preempted ones recomputed from their tokens) in arrival order
   while blocks and batch room last, each taking the leading blocks the prefix cache holds
   for it (a request whose next block another request is computing waits for it; see
   `prefix_cache`): one vision-tower call, one encoder call per branch (images found in the
   encoder cache skip them), one ragged prefill for all;
2. chooses the next token of every running request and decodes them in one step (a CUDA
   graph per batch-size bucket); a request whose round ends gets its perception spliced
   in (prefilled at the next step) or finishes;
3. retires finished requests, giving their blocks back.
Admission keeps room for the running requests to reach their rounds' token limits, so
growth alone does not preempt; when a running request still needs a block and none is free
(a perception segment longer than foreseen), the running request with the least to
recompute is preempted: its blocks are freed and it waits to be recomputed from its
tokens, with the same inputs, so its result does not change. Prefill is chunked under a
per-step token budget (`max_num_batched_tokens`). Nothing is lost and nothing crashes: a
request that alone exceeds the cache or `max_seq_len` ends with `length` (or `no_room`
for a perception segment) and a message.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import logging
import threading
import time
from contextlib import contextmanager
from collections.abc import Mapping, Sequence
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from ..checkpoint import VPTBundle, resolve_device, resolve_dtype
from ..ops import set_backend
from ..ops._registry import device_guard
from ..sampling import SamplingParams, answer_seed, check_batch
from .cache import PagedKVCache, SequenceBound
from .decode import BUCKETS, DecodeStep
from .encoder_cache import EncoderCache
from .prefix_cache import PrefixCache, settings_key
from .runner import Runner
from .sampler import BatchSampler
from .segments import SegmentRunner
from .splice import Splicer
from .requests import RequestIntake, result_of
from .state import (Event, FinishEvent, GenerationResult, PerceptionEvent, PerceptionTrace, Request, Status, TokenEvent,
                    TokenLogprob)
from .structured import GrammarBook
from .text import IncrementalText, find_stop


DEFAULT_MAX_SEQ_LEN = 4096
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048  # vLLM's default for chunked prefill under online serving
logger = logging.getLogger("vpt_fast.engine")


class EngineDead(RuntimeError):
    """A device failure left the engine unusable: it takes no request (rebuild it, or restart
    the process; a CUDA error poisons the process's context)."""


@dataclasses.dataclass(frozen=True)
class GraphCapture:
    """What capturing the decode graphs at engine build took."""

    buckets: tuple[int, ...]  # the batch sizes captured
    seconds: float
    bytes: int  # device memory the graphs reserved


def _is_device_error(error: BaseException) -> bool:
    """Whether `error` came from the device itself (a CUDA error that poisons the context), as
    opposed to a bug or bad data in one step."""
    if isinstance(error, getattr(torch, "AcceleratorError", ())) and not isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "CUDA error" in str(error)


class Engine:
    """Single-pass VPT generation over a loaded bundle (see `vpt_fast.from_pretrained`).

    Step API (one caller at a time; `AsyncEngine` serves many threads and tasks):
    `add_request` -> request id, `step()` -> events, `abort(id)`, `has_unfinished()`.
    `generate` and `stream` run a batch to completion over it. Calls from several threads
    take turns; a second call from a thread whose `stream()` is still open raises
    RuntimeError.
    """

    def __init__(self, bundle: VPTBundle, max_seq_len: int | None = None, max_batch_size: int = 32,
                 cuda_graphs: bool | None = None, image_pipeline: str = "pil", kv_cache_tokens: int | None = None,
                 kv_cache_gib: float | None = None, block_size: int = 16, backend: str | dict[str, str] | None = None,
                 capture_graphs: str = "eager", max_num_batched_tokens: int | None = DEFAULT_MAX_NUM_BATCHED_TOKENS,
                 enable_prefix_caching: bool = True, encoder_cache_gib: float | None = None):
        """max_seq_len: the most tokens one request's sequence may hold (default: 4096, or the
        model's max_position_embeddings when smaller); max_batch_size: the most requests running
        at once (decoded together); cuda_graphs: capture decode steps as CUDA graphs (default:
        on when the model is on a CUDA device); capture_graphs: "eager" captures the graph of
        every batch-size bucket up to max_batch_size here, after the KV cache is allocated
        (`graph_capture` says what it took), "lazy" at the first step of each bucket (a pause
        for whoever runs then); max_num_batched_tokens: the most tokens one step computes,
        decoded ones included (vLLM's option): a longer prompt or perception segment is
        prefilled in chunks over several steps while the others keep decoding (None: no bound);
        image_pipeline: "pil" resizes
        images with PIL on the host exactly as the two-round flow does, "device" uploads
        each original image once and makes every crop's patches with `ops.crop_patch_embed`
        on the model's device (within two 8-bit levels of PIL's resampling, so greedy tokens
        may differ). The KV cache holds kv_cache_tokens tokens, or as many as fit in
        kv_cache_gib GiB (default: max(max_seq_len, 1024 * max_batch_size) tokens), in
        blocks of block_size tokens; it is allocated here. backend: the ops' backends, asked for
        once for the process (`vpt_fast.ops.set_backend`: "torch", "triton", "ext", or per op
        "kv_splice=ext,decode_attention=triton"); default: VPT_FAST_BACKEND, else automatic.
        enable_prefix_caching: a request whose leading full blocks are in the cache (the same
        conversation prefix with the same images) takes them instead of computing them (vLLM's
        option; see `prefix_cache`); encoder_cache_gib: the budget of the cache of vision-tower
        and branch-encoder outputs by image (see `encoder_cache`; default: room for 4 images of
        the largest size per request of a full batch; 0 turns it off)."""
        if image_pipeline not in ("pil", "device"):
            raise ValueError(f"image_pipeline must be 'pil' or 'device', got {image_pipeline!r}")
        if capture_graphs not in ("eager", "lazy"):
            raise ValueError(f"capture_graphs must be 'eager' or 'lazy', got {capture_graphs!r}")
        if backend is not None:
            set_backend(backend)
        text = bundle.model.config.text_config
        if max_seq_len is None:
            max_seq_len = min(DEFAULT_MAX_SEQ_LEN, text.max_position_embeddings)
        checked = [("max_seq_len", max_seq_len, 2), ("max_batch_size", max_batch_size, 1), ("block_size", block_size, 1)]
        if max_num_batched_tokens is not None:
            checked.append(("max_num_batched_tokens", max_num_batched_tokens, 1))
        for name, value, low in checked:
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not isinstance(enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be True or False, got {enable_prefix_caching!r}")
        if encoder_cache_gib is not None and (not isinstance(encoder_cache_gib, (int, float))
                                              or isinstance(encoder_cache_gib, bool) or not encoder_cache_gib >= 0):
            raise ValueError(f"encoder_cache_gib must be a number >= 0, got {encoder_cache_gib!r}")
        if max_batch_size > BUCKETS[-1]:
            raise ValueError(f"max_batch_size must be an int in [1, {BUCKETS[-1]}], got {max_batch_size!r}")
        self.bundle = bundle
        self.runner = Runner(bundle.model)
        try:
            resolve_device(self.runner.device)
            resolve_dtype(self.runner.dtype)
        except ValueError as e:
            raise ValueError(f"the model cannot run here: {e}") from None
        if max_seq_len > text.max_position_embeddings:
            raise ValueError(f"max_seq_len {max_seq_len} is above the model's max_position_embeddings "
                             f"{text.max_position_embeddings}")
        self.image_pipeline = image_pipeline
        self.max_seq_len = max_seq_len
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.cuda_graphs = self.runner.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.vocab = bundle.vocab
        head_dim = text.hidden_size // text.num_attention_heads
        tokens = _cache_tokens(kv_cache_tokens, kv_cache_gib, max_seq_len, max_batch_size,
                               2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * self.runner.dtype.itemsize)
        self.graph_capture: GraphCapture | None = None  # what the eager capture took
        with device_guard(self.device):
            self.cache = PagedKVCache(text.num_hidden_layers, -(-tokens // block_size) + 1, block_size,
                                      text.num_key_value_heads, head_dim, self.runner.dtype, self.device)
            self.bound = SequenceBound(max_seq_len, self.cache.capacity)
            self.limit = self.bound.tokens  # the most tokens one sequence can hold
            self._decoder = DecodeStep(self.runner, self.cache, self.cache.blocks_for(self.limit), self.cuda_graphs)
            # each running request's block table, in the row of its slot (the sampler's)
            self._tables = np.zeros((max_batch_size, self._decoder.max_blocks), dtype=np.int64)
            if self.cuda_graphs and capture_graphs == "eager":
                self.graph_capture = GraphCapture(*self._decoder.capture(max_batch_size))
                logger.info("captured decode graphs for batch sizes %s in %.2f s (%.1f MiB)",
                            self.graph_capture.buckets, self.graph_capture.seconds, self.graph_capture.bytes / 2**20)
        settings = settings_key(bundle.processor, image_pipeline)
        if encoder_cache_gib is None:
            budget = 4 * max_batch_size * _largest_image_bytes(bundle, self.runner.dtype)
        else:
            budget = int(encoder_cache_gib * 2**30)
        self.encoder_cache = EncoderCache(budget)
        self._segments = SegmentRunner(bundle, self.runner, self.cache, image_pipeline, self.encoder_cache)
        self._sampler = BatchSampler(max_batch_size, self.runner.lm_head.weight.shape[0], self.device)
        self._splicer = Splicer(bundle, self.cache, self.bound, self._shrink, settings)
        self.two_pass = bundle.vpt_config.two_pass
        self.start_to_action = bundle.vpt_config.start_to_action
        self.action_ids = set(self.start_to_action.values())
        reencoding = {t for a in self.vocab.actions.values() for t in (a.action, a.pad)}
        self.prefix_cache = PrefixCache(self.cache, self.vocab.image_pad, reencoding | self.action_ids,
                                        self.action_ids if self.two_pass else set(), enable_prefix_caching)
        self.enable_prefix_caching = enable_prefix_caching
        # what opens a perception this engine serves: allowed where a constrained answer would begin
        openers = frozenset(t for t in [self.vocab.region_start, *(a.start for k, a in self.vocab.actions.items()
                                                                   if k in bundle.reencode_kinds)] if t is not None)
        v = self.vocab
        reserved = {v.image_pad, v.vision_start, v.vision_end, v.region_start, v.region_end, *(v.x or ()), *(v.y or ()),
                    *(t for a in v.actions.values() for t in dataclasses.astuple(a))}
        self.grammars = GrammarBook(bundle.tokenizer, self.runner.lm_head.weight.shape[0], v.im_end, openers,
                                    frozenset(t for t in reserved if t is not None))
        self._bitmask: torch.Tensor | None = None  # (max_batch_size, words) int32, made when first needed
        self._intake = RequestIntake(bundle, self.bound, settings, self.grammars)
        self._waiting: list[Request] = []  # by arrival
        self._running: list[Request] = []  # by arrival
        self._done: list[Request] = []  # finished outside a step (failed checks, aborted): reported by the next step
        self._requests: dict[int, Request] = {}  # every request not yet reported finished (each answer of n)
        self._left: dict[int, int] = {}  # answers not yet finished, by group, for requests with n > 1
        self._ids = itertools.count()
        self.num_preemptions = 0  # requests preempted so far (and recomputed later)
        self._stats = dict.fromkeys(("prompt_tokens", "computed_prompt_tokens", "cached_prompt_tokens", "spliced_tokens",
                                     "recomputed_tokens"), 0)
        # free blocks admission keeps beyond what the running requests may still take (vLLM's 1%)
        self._watermark = max(1, self.cache.usable_blocks // 100)
        self.dead: str | None = None  # why the engine cannot serve any more (a device failure)
        self._failed_steps = 0  # consecutive steps that raised
        self._lock = threading.Lock()
        self._owner: int | None = None  # thread holding the engine for a call

    @property
    def device(self) -> torch.device:
        return self.runner.device

    # ------------------------------------------------------------------ state, for callers and metrics

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def kv_blocks_used(self) -> int:
        return self.cache.num_used

    @property
    def kv_blocks_total(self) -> int:
        return self.cache.usable_blocks

    def has_unfinished(self) -> bool:
        """Whether a request added has not had its FinishEvent yet."""
        return bool(self._requests)

    # ------------------------------------------------------------------ step API

    def add_request(self, image, prompt: str, params: SamplingParams | None = None, forced_tokens=None) -> int:
        """Queue one request; returns its id. image: None, one image (path or PIL) or a list of
        them, one per `<image>` of the prompt. An unusable image, prompt or forced tokens do not
        raise: the request finishes with reason "error" and a message at the next step.
        params: a `SamplingParams` (default: greedy, 64 tokens a round)."""
        with self._one_call():
            return self._add(image, prompt, params, forced_tokens)

    def step(self) -> list[Event]:
        """One scheduler iteration; returns the events it produced (tokens, perceptions, finishes)."""
        with self._one_call():
            return self._step()

    def abort(self, request_id: int) -> bool:
        """Stop a request now and give its blocks back; it finishes with reason "abort" at the
        next step. False when it is unknown or already finished."""
        with self._one_call():
            return self._abort(request_id)

    def prepare(self, image, prompt, params: SamplingParams | None = None, forced_tokens=None) -> Request:
        """A request checked, loaded and encoded, not yet queued (`add_prepared` queues it). It
        touches no scheduling state, so any thread may call it while the engine runs: a server
        prepares requests in the threads that receive them. One that fails its checks comes back
        finished, with its reason and message."""
        return self._intake.make(next(self._ids), image, prompt, params, forced_tokens)

    def add_prepared(self, request: Request) -> int:
        """Queue a request made by `prepare`; its id."""
        with self._one_call():
            self.check_alive()
            self._enqueue(request)
            return request.id

    def clear(self) -> list[int]:
        """Forget every request in flight without reporting them (after a failure outside a step,
        when their state cannot be trusted); their ids."""
        with self._one_call():
            return self._drop_all()

    # ------------------------------------------------------------------ batch API

    def generate(self, images, prompts, max_new_tokens: int = 64, forced_tokens=None, **kwargs) -> list:
        """Answer a batch of requests; one GenerationResult per request, in order (with n > 1,
        one list of n GenerationResults per request, by answer index).

        Same arguments as `stream`.
        """
        return _collect(self.stream(images, prompts, max_new_tokens, forced_tokens, **kwargs), len(prompts),
                        kwargs.get("n", 1))

    def stream(self, images, prompts, max_new_tokens: int = 64, forced_tokens=None, *, do_sample: bool = False,
               temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
               answer_max_new_tokens: int | None = None, max_perception_rounds: int = 1,
               return_logits: bool = False, **options) -> Iterator[Event]:
        """Generate, yielding tokens, perceptions and finished requests as they happen; events
        name requests by their index in this call.

        images / prompts / forced_tokens: per request its images (None, one path or PIL image,
        or a list of them) and one prompt (a str or a Conversation with one `<image>` per
        image, or none: the images then open the first user turn); a perception looks at the
        request's first image (docs/vpt.md §7); forced_tokens[i] scripts the first round-1
        tokens of request i. The other arguments, and any other `SamplingParams` field given by
        name (stop, presence_penalty, logprobs, n, structured, ...), make one `SamplingParams`
        for every request (each sampled request's noise comes from `seed`: see `sampler`). A
        request whose image, prompt or
        forced tokens are unusable finishes with reason "error" and its message; the others
        go on. The engine must have no request of the step API in flight.
        """
        params = SamplingParams(max_new_tokens=max_new_tokens, answer_max_new_tokens=answer_max_new_tokens,
                                do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                max_perception_rounds=max_perception_rounds, return_logits=return_logits, **options)
        forced = check_batch(images, prompts, forced_tokens)
        yield from self._batch([(images[i], prompts[i], params, forced[i]) for i in range(len(prompts))])

    def chat(self, messages, params: SamplingParams | None = None, forced_tokens=None):
        """Answer a conversation given as chat messages, or a batch of them.

        messages: a list of {"role", "content"} dicts (OpenAI's or Hugging Face's shapes, see
        `vpt_fast.chat.from_messages`: system, user and assistant turns; text parts and image
        parts in any user turn, {"type": "image", "image": PIL image | path} or {"type":
        "image_url", "image_url": {"url": "data:..."}}), answered as a GenerationResult; or a
        list of such lists, answered as a list in order. params: a SamplingParams for every
        conversation (default: greedy, 64 tokens a round); forced_tokens: round-1 tokens to
        script (one list for a single conversation, one entry per conversation for a batch).
        A conversation whose messages or images are unusable finishes with reason "error" and
        its message (naming the image, by its index, when there are several); the others go on.
        With params.n > 1, each conversation's answer is a list of n GenerationResults."""
        from ..chat import from_messages
        from ..media import MediaError, MediaPolicy

        single = not (isinstance(messages, Sequence) and messages and all(
            isinstance(m, Sequence) and not isinstance(m, (str, bytes, Mapping)) for m in messages))
        batch = [messages] if single else list(messages)
        if single:
            forced = [forced_tokens]
        elif forced_tokens is None:
            forced = [None] * len(batch)
        elif isinstance(forced_tokens, Sequence) and len(forced_tokens) == len(batch):
            forced = list(forced_tokens)
        else:
            raise ValueError(f"forced_tokens must have one entry (None or token ids) per conversation ({len(batch)})")
        media, jobs, failed = MediaPolicy(), [], {}
        for i, conv in enumerate(batch):
            try:
                images, conversation = from_messages(conv)
                images = media.load_each(images, lambda image: isinstance(image, str) and image.startswith("data:"))
            except (ValueError, TypeError, MediaError) as e:
                failed[i] = f"conversation {i}: {e}" if not single else str(e)
                images, conversation = None, None
            jobs.append((images, conversation, params, forced[i]))
        n = params.n if params is not None else 1
        todo = [i for i in range(len(batch)) if i not in failed]
        answered = _collect(self._batch([jobs[i] for i in todo]), len(todo), n)
        results: list = [None] * len(batch)
        for i, answer in zip(todo, answered):
            results[i] = answer
        for i, message in failed.items():
            failure = [GenerationResult([], [], [], "", "error", error=message, index=k) for k in range(n)]
            results[i] = failure if n > 1 else failure[0]
        return results[0] if single else results

    def _batch(self, jobs, label: str = "request") -> Iterator[Event]:
        """Run (image, prompt, params, forced tokens) requests as one call's batch; events name
        requests by their index in `jobs`, messages by `label` and that index."""
        with self._one_call():
            if self._requests:
                raise RuntimeError(f"{len(self._requests)} request(s) added with add_request are in flight: drive them "
                                   f"with step() first (generate and stream run a batch of their own)")
            ids = [self._add(image, prompt, params, forced, name=f"{label} {i}")
                   for i, (image, prompt, params, forced) in enumerate(jobs)]
            index = {rid: i for i, rid in enumerate(ids)}
            try:
                while self._requests:
                    for event in self._step():
                        yield dataclasses.replace(event, request=index[event.request])
            finally:
                for rid in list(self._requests):  # a stream closed early: drop what it left
                    self._abort(rid)
                    del self._requests[rid]
                self._left.clear()
                self._done.clear()

    @contextmanager
    def _one_call(self):
        """Hold the engine for one call: calls from other threads wait their turn; a call from
        the thread already holding it (a stream() left open) is refused, as it could never
        get its turn."""
        me = threading.get_ident()
        if self._owner == me:
            raise RuntimeError("this engine is already serving a generate/stream call in this thread (a stream() "
                               "not finished or closed yet): finish or close that stream first, or use another Engine")
        with self._lock:
            self._owner = me
            try:
                with device_guard(self.device):
                    yield
            finally:
                self._owner = None

    # ------------------------------------------------------------------ requests

    def _add(self, image, prompt, params, forced_tokens, name: str | None = None) -> int:
        self.check_alive()
        r = self._intake.make(next(self._ids), image, prompt, params, forced_tokens, name)
        self._enqueue(r)
        return r.id

    def _enqueue(self, r: Request) -> None:
        self._requests[r.id] = r
        if r.params.n > 1:
            self._left[r.id] = r.params.n
        (self._done if r.finished else self._waiting).append(r)

    def _abort(self, request_id: int) -> bool:
        """Abort every answer of the request `request_id` still going."""
        aborted = False
        for r in [m for m in self._requests.values() if m.group == request_id and not m.finished]:
            if r in self._running:
                self._running.remove(r)
            else:
                self._waiting.remove(r)
            self._release(r)
            r.finish("abort", f"{r.name}: aborted")
            self._done.append(r)
            aborted = True
        return aborted

    def _drop_all(self) -> list[int]:
        """Forget every request (after a failed step, whose state cannot be trusted); their ids."""
        ids = list(dict.fromkeys(r.group for r in self._requests.values()))
        self._requests.clear()
        self._left.clear()
        self._waiting.clear()
        self._running.clear()
        self._done.clear()
        self.cache.reset()
        self.prefix_cache.forget_requests()
        self._sampler.reset()
        return ids

    def _shrink(self, r: Request, length: int) -> None:
        """Give back r's blocks past its first `length` tokens (a rollback). The block the cut
        falls in is written next: when other requests hold it too (prefix caching), r gives
        its hold up and recomputes the kept tokens of that block into a block of its own; when
        r alone holds it, it is no longer findable by its hash."""
        bs = self.cache.block_size
        keep = self.cache.blocks_for(length)
        self.cache.release(r.blocks[keep:])
        del r.blocks[keep:]
        self.prefix_cache.forget_after(r, length)
        if length % bs and r.blocks:
            last = r.blocks[-1]
            if self.cache.holders(last) > 1:
                self.cache.release([last])
                r.blocks.pop()
                r.num_cached = min(r.num_cached, len(r.blocks) * bs)
            else:
                self.cache.unpublish(last)

    def _release(self, r: Request) -> None:
        """Give back r's blocks and its sampling slot."""
        self.cache.release(r.blocks)
        self.prefix_cache.drop(r)
        r.blocks = []
        r.num_cached = 0
        r.published = 0
        if r.slot is not None:
            self._sampler.give_back(r.slot)
            r.slot = None

    def _future_blocks(self, r: Request) -> int:
        """The blocks r holds once its current round runs to its token limit: what admission keeps
        free for it, so that requests let in are not preempted again as they grow."""
        left = max(r.round_limit - len(r.round_ids), 0)
        return self.cache.blocks_for(min(len(r.ids) + left, self.limit))

    def stats(self) -> dict[str, int]:
        """Counters since the engine was built, and its state now: prompt_tokens (round-1 prompts
        of the requests admitted), computed_prompt_tokens and cached_prompt_tokens (of those, the
        tokens prefilled and the tokens found in the prefix cache), spliced_tokens (perception
        segments prefilled), recomputed_tokens (prefilled again after a preemption),
        prefix_cache_queries and prefix_cache_hits (tokens looked up and found at every admission,
        recomputations included), vision_encoder_images (images, crops and branch inputs
        actually encoded), vision_cache_queries and vision_cache_hits (encoder-cache lookups and
        hits), preemptions, kv_blocks_used, kv_blocks_total, running, waiting."""
        return {**self._stats, "prefix_cache_queries": self.prefix_cache.queries,
                "prefix_cache_hits": self.prefix_cache.hits, "vision_encoder_images": self._segments.encoded_images,
                "vision_cache_queries": self.encoder_cache.queries, "vision_cache_hits": self.encoder_cache.hits,
                "preemptions": self.num_preemptions, "kv_blocks_used": self.kv_blocks_used,
                "kv_blocks_total": self.kv_blocks_total, "running": self.num_running, "waiting": self.num_waiting}

    def _preempt(self, r: Request) -> None:
        """Free r's blocks and queue it to be recomputed from its tokens."""
        self.num_preemptions += 1
        r.recompute = True
        self._release(r)
        r.logits = None
        r.last_hidden = None
        r.status = Status.WAITING
        self._running.remove(r)
        bisect.insort(self._waiting, r, key=lambda x: x.id)

    def _reserve(self, r: Request, tokens: int) -> bool:
        """Blocks for r's first `tokens` tokens, preempting running requests while none are free
        (the one with the fewest tokens first, the youngest among equals: the least to recompute);
        False when r itself was preempted."""
        need = self.cache.blocks_for(tokens) - len(r.blocks)
        while need > self.cache.num_free:
            victim = min((v for v in self._running if not v.finished), key=lambda v: (len(v.ids), -v.id))
            self._preempt(victim)
            if victim is r:
                return False
        if need > 0:
            new = self.cache.allocate(need)
            self._tables[r.slot, len(r.blocks): len(r.blocks) + need] = new
            r.blocks += new
        return True

    # ------------------------------------------------------------------ one step

    def check_alive(self) -> None:
        """Raise EngineDead when a device failure has left the engine unusable."""
        if self.dead is not None:
            raise EngineDead(f"the engine is dead and takes no requests: {self.dead}")

    def _step(self) -> list[Event]:
        """One iteration. An exception inside it ends every running request (all the step may
        have touched) with "error"; a device error, or a second failed step in a row, also marks
        the engine dead (`dead` says why) and ends the waiting requests too."""
        events: list[Event] = []
        try:
            self._prefill(events)
            self._decode(events)
        except Exception as e:
            logger.exception("vpt_fast engine step failed")
            self._failed_steps += 1
            self._fail(e, events)
        else:
            self._failed_steps = 0
        self._retire(events)
        return events

    def _fail(self, error: Exception, events: list[Event]) -> None:
        """After a step raised: its events are dropped (their requests end here), running
        requests end with "error"; when the failure leaves the engine unusable, everything."""
        what = f"{type(error).__name__}: {error}"
        if _is_device_error(error):
            self.dead = f"device failure ({what})"
        elif self._failed_steps >= 2:
            self.dead = f"{self._failed_steps} steps in a row failed, the last with {what}"
        events.clear()
        ended = list(self._running) + (list(self._waiting) if self.dead is not None else [])
        for r in ended:
            if not r.finished:
                r.finish("error", f"engine failure: {what}")
            self._release(r)
            r.logits = None
        self._running.clear()
        if self.dead is not None:
            self._waiting.clear()
        self._done.extend(ended)

    def _prefill(self, events: list[Event]) -> None:
        jobs = [r for r in list(self._running) if r.pending and r.status is Status.RUNNING and self._reserve(r, len(r.ids))]
        jobs = [r for r in jobs if r.status is Status.RUNNING]
        reserved = None  # blocks the running requests may still take: summed only when someone waits
        at = 0  # the first waiting request not put off to a later step
        while at < len(self._waiting) and len(self._running) < self.max_batch_size:
            if reserved is None:
                reserved = sum(self._future_blocks(r) - len(r.blocks) for r in self._running if not r.finished)
            r = self._waiting[at]
            found = self.prefix_cache.match(r)
            if self.prefix_cache.waits(r, found):
                at += 1
                continue
            total = self.cache.blocks_for(len(r.ids))
            # blocks it takes from the free ones: new ones, and found ones that no request holds
            taken = total - len(found) + sum(1 for b in found if self.cache.holders(b) == 0)
            growth = self._future_blocks(r) - total
            room = self.cache.num_free - (reserved + self._watermark if self._running else 0)
            if taken > self.cache.num_free or taken + growth > room:
                break
            reserved += growth
            self._waiting.pop(at)
            self.prefix_cache.count(r, found)
            self.prefix_cache.expect(r, found)
            for block in found:  # before allocating, which could hand them out again
                self.cache.share(block)
            r.blocks = found + self.cache.allocate(total - len(found))
            r.num_cached = r.published = len(found)
            r.num_cached *= self.cache.block_size
            if not r.counted:
                self._stats["cached_prompt_tokens"] += r.num_cached
            r.slot = self._sampler.take(r.params, r.seed)
            self._tables[r.slot, :total] = r.blocks
            r.status = Status.RUNNING
            bisect.insort(self._running, r, key=lambda x: x.id)
            jobs.append(r)
        for r in jobs:
            if r.prefill_kind is None:  # what the tokens it is about to prefill count as
                r.prefill_kind = "recomputed_tokens" if r.recompute else "spliced_tokens" if r.counted else \
                    "computed_prompt_tokens"
                if not r.counted:
                    self._stats["prompt_tokens"] += len(r.turn.ids)
                    r.counted = True
                r.recompute = False
        if not jobs:
            return
        decoding = sum(1 for r in self._running if not r.pending)
        budget = None if self.max_num_batched_tokens is None else max(self.max_num_batched_tokens - decoding, 1)
        fed = self._segments.run(jobs, budget)
        now = time.perf_counter()
        for r in jobs:
            if r.id in fed:
                self._stats[r.prefill_kind] += fed[r.id]
                self.prefix_cache.publish(r)
            if r.pending:
                continue  # a chunk of it: the rest at the next steps
            r.prefill_kind = None
            # its sequence changed: the penalties read it anew
            self._sampler.fill_seen(r.slot, r.ids, r.round_ids)
            r.unseen = -1
            pending = r.pending_trace
            if pending is not None:
                trace = PerceptionTrace(pending.kind, pending.cells, pending.boxes, pending.tokens, pending.rolled_back,
                                        now - pending.round_end_time, pending.image)
                r.trace.append(trace)
                r.pending_trace = None
                events.append(PerceptionEvent(r.group, trace, r.index))
            if r.unforked:
                self._fork(r)

    def _fork(self, r: Request) -> None:
        """r's prompt is in the cache and its first logits are ready: its other n - 1 answers
        start from here, each holding r's full blocks and a copy of its last partial block, with
        the same logits and a seed of its own. An answer with no batch room or block for it
        waits as a request of its own (and finds r's blocks when prefix caching is on)."""
        bs = self.cache.block_size
        full, partial = divmod(len(r.ids), bs)
        n, r.unforked = r.unforked, 0
        for k in range(r.params.n - n, r.params.n):
            child = r.fork(next(self._ids), k, answer_seed(r.seed, k))
            self._requests[child.id] = child
            child.blocks, child.num_cached, child.published = [], 0, 0
            child.logits = child.last_hidden = None
            if len(self._running) >= self.max_batch_size or (partial and self.cache.num_free < 1):
                child.status = Status.WAITING
                child.counted = False
                bisect.insort(self._waiting, child, key=lambda x: x.id)
                continue
            for block in r.blocks[:full]:
                self.cache.share(block)
            child.blocks = r.blocks[:full]
            if partial:
                (own,) = self.cache.allocate(1)
                self.cache.copy_block(r.blocks[full], own)
                child.blocks.append(own)
            child.num_cached, child.published = len(r.ids), min(r.published, full)
            child.logits, child.last_hidden = r.logits, r.last_hidden
            child.slot = self._sampler.take(child.params, child.seed)
            self._sampler.fill_seen(child.slot, child.ids, child.round_ids)
            self._tables[child.slot, : len(child.blocks)] = child.blocks
            child.status = Status.RUNNING
            bisect.insort(self._running, child, key=lambda x: x.id)

    def _choose(self, ready: list[Request]) -> tuple[list[int | str], list[TokenLogprob | None]]:
        """The next token of each request (forced, sampled from its own seed, or greedy: see
        `sampler.BatchSampler`; within its grammar, with a structured output), or, for a request
        whose logits are not finite, the message it ends with (that request alone: the others'
        tokens do not depend on it); and each one's log-probability entry where asked for."""
        scores = torch.stack([r.logits for r in ready])
        for r, row in zip(ready, scores):
            if r.logits_log is not None:
                r.logits_log.append(row.detach().to("cpu", copy=True))
        forced = [r.forced[len(r.round_ids)] if r.round == 0 and r.forced is not None and len(r.round_ids) < len(r.forced)
                  else -1 for r in ready]
        allowed = None
        constrained = [b for b, r in enumerate(ready) if r.constraint is not None and r.constraint.active and forced[b] < 0]
        if constrained:
            if self._bitmask is None:
                self._bitmask = torch.empty(self.max_batch_size, self.grammars.words, dtype=torch.int32)
            allowed = self._bitmask[: len(ready)]
            allowed.fill_(-1)
            for b in constrained:
                ready[b].constraint.fill(allowed, b)
        k = max((r.params.logprobs for r in ready if r.params.logprobs is not None), default=-1)
        alternative = [self.start_to_action.get(r.ids[-1], -1) for r in ready] if k >= 0 else None
        tokens, finite, lp = self._sampler.choose(scores, [r.slot for r in ready], [len(r.generated) for r in ready],
                                                  forced, [r.unseen for r in ready], allowed, k, alternative)
        chosen: list[int | str] = []
        entries: list[TokenLogprob | None] = []
        for b, (r, t, ok) in enumerate(zip(ready, tokens, finite)):
            r.unseen = -1
            chosen.append(t if ok else f"{r.name}: the model's logits hold NaN or infinite values; the request cannot go on")
            if r.params.logprobs is None:
                entries.append(None)
                continue
            n = r.params.logprobs
            top = list(zip(lp.top_ids[b][:n], lp.top_values[b][:n]))
            # the chosen token's, and the action token's for when the decode puts it in the chosen one's place
            entries.append((TokenLogprob(t, lp.chosen[b], top), TokenLogprob(alternative[b], lp.alternative[b], top)))
        return chosen, entries

    def _decode(self, events: list[Event]) -> None:
        ready = [r for r in self._running if r.logits is not None]
        if not ready:
            return
        feed = []
        chosen, entries = self._choose(ready)
        for r, t, entry in zip(ready, chosen, entries):
            r.logits = None
            if isinstance(t, str):
                r.finish("error", t)
                continue
            stop = t == self.vocab.im_end or t in r.params.stop_token_ids
            round_done = stop or len(r.round_ids) + 1 >= r.round_limit
            substituted = False
            if not round_done:
                action = self.start_to_action.get(r.ids[-1])
                if action is not None:
                    substituted = t != action
                    t = action  # the published decode forces <|X_action|> after <|X_action_start|>
            r.round_ids.append(t)
            r.generated.append(t)
            if entry is not None:
                entry = entry[1] if substituted else entry[0]
                r.logprobs_log.append(entry)
            events.append(TokenEvent(r.group, t, r.round, r.index, entry))
            if r.constraint is not None and not r.constraint.take(t):
                r.tail = [t]
                r.finish("error", f"{r.name}: the scripted round-1 token {t} does not fit the structured output")
                continue
            if r.stop_text is not None and not stop and self._stop_string(r, t):
                r.tail = [t]
                r.end_round()
                r.finish("stop")
                continue
            if round_done:
                r.tail = [t]
                self._splicer.close_round(r, "stop" if stop else "length")
                if not r.finished:  # a perception: the answer starts afresh
                    if r.constraint is not None:
                        r.constraint.next_round()
                    if r.stop_text is not None:
                        r.stop_text = IncrementalText(self.bundle.tokenizer)
                continue
            if len(r.ids) >= self.limit:
                r.tail = [t]
                r.finish("length", f"{r.name}: the sequence reached {self.bound}")
                continue
            control = None
            if self.two_pass and t in self.action_ids:
                control = r.control = r.control_before(len(r.ids))
            r.append_token(t, control)
            r.unseen = t
            feed.append(r)
        for r in ready:
            if r.finished:  # its blocks serve the others' reservations below
                self._release(r)
        fed = [r for r in feed if r.status is Status.RUNNING and self._reserve(r, len(r.ids))]
        fed = [r for r in fed if r.status is Status.RUNNING]
        if not fed:
            return
        tokens, overrides, positions, slots, lens = [], [], [], [], []
        bs = self.cache.block_size
        for r in fed:
            n = len(r.ids)
            span = r.spans.get(n - 1)
            tokens.append(r.ids[-1])
            overrides.append(span[0] if span is not None else None)
            positions.append(r.positions.at(n - 1))
            slots.append(r.blocks[(n - 1) // bs] * bs + (n - 1) % bs)
            lens.append(n)
        tables = self._tables[[r.slot for r in fed]]  # rows kept as blocks are added, never rebuilt
        logits, hidden = self._decoder(tokens, overrides, positions, slots, lens, tables)
        publish = self.prefix_cache.enabled
        for b, r in enumerate(fed):
            r.num_cached = len(r.ids)
            r.logits = logits[b]
            r.last_hidden = (len(r.ids) - 1, hidden[b])
            if publish and r.num_cached % bs == 0:  # a block filled up
                self.prefix_cache.publish(r)

    def _stop_string(self, r: Request, token: int) -> bool:
        """Whether `token` completes one of r's stop strings in its round's text."""
        new = r.stop_text.add(token)
        if not new:
            return False
        text = r.stop_text.text
        longest = max(map(len, r.params.stop))
        found = find_stop(text, r.params.stop, max(0, len(text) - len(new) - longest + 1))
        if found is None:
            return False
        r.stop_reason = found[1]
        return True

    def _retire(self, events: list[Event]) -> None:
        finished = self._done + [r for r in self._running if r.finished]
        self._done = []
        for r in finished:
            if r in self._running:
                self._running.remove(r)
            self._release(r)
            r.status = Status.FINISHED
            del self._requests[r.id]
            result = result_of(r, self.bundle.tokenizer, self.vocab.im_end)
            # answers never forked (the request ended before its prefill did) end as it did
            results = [result] + [dataclasses.replace(result, index=k) for k in range(r.params.n - r.unforked, r.params.n)]
            r.unforked = 0
            for one in results:
                left = self._left.pop(r.group, 1) - 1
                if left:
                    self._left[r.group] = left
                events.append(FinishEvent(r.group, one, one.index, final=left == 0))

    # ------------------------------------------------------------------ results


def _collect(events: Iterator[Event], count: int, n: int) -> list:
    """The results of `count` requests from their events: one GenerationResult each, or with
    n > 1 answers, a list of n by index."""
    results: list = [[None] * n for _ in range(count)]
    for event in events:
        if isinstance(event, FinishEvent):
            results[event.request][event.index] = event.result
    return [r[0] for r in results] if n == 1 else results


def _largest_image_bytes(bundle: VPTBundle, dtype: torch.dtype) -> int:
    """Bytes of the vision-tower output of the largest image the processor makes (the longer
    side capped at max_side, square)."""
    side = bundle.processor.max_side
    tokens = bundle.processor.token_count(Image.new("RGB", (side, side)))
    return tokens * bundle.model.config.text_config.hidden_size * dtype.itemsize


def _cache_tokens(tokens: int | None, gib: float | None, max_seq_len: int, max_batch_size: int, per_token: int) -> int:
    if tokens is not None and gib is not None:
        raise ValueError("give kv_cache_tokens or kv_cache_gib, not both")
    if gib is not None:
        if not isinstance(gib, (int, float)) or isinstance(gib, bool) or not gib > 0:
            raise ValueError(f"kv_cache_gib must be a positive number, got {gib!r}")
        tokens = int(gib * 2**30) // per_token
        if tokens < 1:
            raise ValueError(f"kv_cache_gib {gib} holds no token ({per_token} bytes each)")
        return tokens
    if tokens is None:
        return max(max_seq_len, 1024 * max_batch_size)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise ValueError(f"kv_cache_tokens must be a positive int, got {tokens!r}")
    return tokens
