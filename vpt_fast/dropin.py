"""`model.generate(**inputs)` through the engine: the drop-in for transformers users.

    model = Qwen2VLForConditionalGeneration.from_pretrained(path)   # or a VPT checkpoint's model
    processor = AutoProcessor.from_pretrained(path)
    vpt_fast.accelerate(model, processor)                          # patches this instance's generate
    inputs = processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                           return_dict=True, return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=64)              # what transformers returns
    vpt_fast.last_results(model)                                   # GenerationResults: traces, reasons
    vpt_fast.restore(model)                                        # transformers' generate again

The patched `generate` takes what a Qwen2-VL processor returns (`input_ids`, `attention_mask`
with left or right padding, `pixel_values`, `image_grid_thw`, `mm_token_type_ids`; a batch
whose samples hold any number of images, text-only ones included) and the generation options the engine honours: greedy or
sampled decoding (`do_sample`, `temperature`, `top_k`, `top_p`), `repetition_penalty`,
`max_new_tokens` / `max_length`, `eos_token_id`, `pad_token_id`, `stop_strings` (with
`tokenizer=`; a sequence ends at the token whose text completes one), `num_return_sequences`
with sampling (a sample's sequences share its prefill, in consecutive rows as transformers
orders them), `return_dict_in_generate` (with `output_scores` / `output_logits` for one
sequence of a stock model: the raw logits behind each new token, and those logits through
transformers' own processors for the options above), a `streamer` (one sequence), or a
`GenerationConfig` holding them; the model's own
`generation_config` fills the rest, as in transformers. It returns what transformers'
generate returns: a LongTensor (batch, prompt length + new tokens), each row the prompt as
given (padding included) then its new tokens padded with the pad id, or with
`return_dict_in_generate=True` a `GenerateDecoderOnlyOutput`.

Greedy decoding gives transformers' tokens (it is tested token for token). Sampling draws
from the same distribution with the engine's own generator per sample (seeded from torch's
global generator, so `torch.manual_seed` makes a call repeatable), not transformers' draws.
Each sample is run without its padding, so a right-padded batch gets the answer its prompt
alone gets (transformers' generate expects left padding for that), and a repetition penalty
counts the sample's own tokens only (transformers' also counts a left-padded sample's pad
tokens as seen).

With a VPT checkpoint the new tokens are the whole conversation the two-round flow ends
with: round 1, and after a perception the turns that show the crop or the re-encoding,
then the answer. `max_new_tokens` bounds each round, as in the two-round flow. A perception
looks at the sample's first image (docs/vpt.md §7); a region crop is taken from the image
the processor made the pixels from (recovered from `pixel_values`); pass `vpt_images=[...]`
(per sample: None, a PIL image or path, or for a sample with several images a list with
one per image, None where the pixels will do) to crop the originals, as the published flow
does. `vpt_force=` scripts round-1 tokens (token
ids or text, one for all samples or one per sample). Every call's `GenerationResult`s (the
perception traces, finish reasons, answer texts) are kept: `vpt_fast.last_results(model)`,
and `output.vpt_results` on a dict output.

What the engine cannot honour goes to transformers' own generate with a warning, once per
reason and model, that says why (or raises ValueError with strict=True): beam search,
several sequences per prompt without sampling, logits processors or stopping criteria of one's
own, assistant models, scores or logits of several sequences or of a VPT model, attentions,
hidden states, options such as
`no_repeat_ngram_size` or `min_new_tokens`, video inputs, `inputs_embeds`, an attention mask
with holes, an end-of-sequence set without `<|im_end|>`,
and a prompt that does not fit the engine's `max_seq_len`.
"""

from __future__ import annotations

import types
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from .preprocess import PixelImage
from .prompt import TokenPrompt, encode
from .sampling import SamplingParams

# GenerationConfig fields the engine honours, and fields with no effect on a single greedy or
# sampled sequence (cache and compile settings, beam-only and assistant-only knobs).
HONOURED = {"max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
            "eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id", "return_dict_in_generate",
            "use_cache", "stop_strings", "num_return_sequences", "output_scores", "output_logits"}
NO_EFFECT = {"transformers_version", "_from_model_config", "cache_implementation", "cache_config", "compile_config",
             "disable_compile", "max_cache_len", "prefill_chunk_size", "continuous_batching_config", "low_memory",
             "early_stopping", "length_penalty", "remove_invalid_values", "is_assistant", "num_assistant_tokens",
             "num_assistant_tokens_schedule", "assistant_confidence_threshold", "assistant_lookbehind",
             "target_lookbehind", "assistant_early_exit", "assistant_ensemble_weight"}
# keyword arguments of generate that are not generation options
CALL_OPTIONS = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus", "assistant_model",
                "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate", "use_model_defaults",
                "assistant_tokenizer")
MODEL_INPUTS = {"attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids", "use_cache"}


@dataclass
class _Patch:
    engine: Any
    original: Any  # what model.generate was before (a bound method)
    had_own: bool  # whether that was an attribute of the instance (not the class's method)
    strict: bool
    warned: set[str] = field(default_factory=set)
    last_results: list = field(default_factory=list)


class Fallback(Exception):
    """Internal: the call goes to transformers' generate, for this reason."""


def patch(model, engine, strict: bool = False):
    """Make `model.generate` (this instance only) run through `engine`; see the module text."""
    if "_vpt_fast_patch" in model.__dict__:
        restore(model)
    had_own = "generate" in model.__dict__
    state = _Patch(engine=engine, original=model.generate, had_own=had_own, strict=strict)
    model.__dict__["_vpt_fast_patch"] = state
    model.__dict__["generate"] = types.MethodType(_generate, model)
    return model


def restore(model):
    """Put back the `generate` the model had before `vpt_fast.accelerate` patched it; a model
    that is not patched is left as it is. Returns the model."""
    state = model.__dict__.pop("_vpt_fast_patch", None)
    if state is None:
        return model
    if state.had_own:
        model.__dict__["generate"] = state.original
    else:
        model.__dict__.pop("generate", None)
    return model


def last_results(model) -> list:
    """The GenerationResults of the patched model's last accelerated `generate` call, one
    per sample (empty after a call that went to transformers' generate)."""
    state = model.__dict__.get("_vpt_fast_patch")
    if state is None:
        raise ValueError("this model is not patched by vpt_fast.accelerate")
    return list(state.last_results)


def _generate(model, *args, **kwargs):
    state: _Patch = model.__dict__["_vpt_fast_patch"]
    vpt_images = kwargs.pop("vpt_images", None)
    vpt_force = kwargs.pop("vpt_force", None)
    state.last_results = []
    try:
        return _accelerated(model, state, args, dict(kwargs), vpt_images, vpt_force)
    except Fallback as why:
        reason = str(why)
    if state.strict:
        raise ValueError(f"vpt_fast: model.generate cannot run this call on the engine: {reason} (strict=True)")
    if vpt_images is not None or vpt_force is not None:
        raise ValueError(f"vpt_fast: this call goes to transformers' generate ({reason}), which takes no vpt_images "
                         f"or vpt_force")
    if reason not in state.warned:
        state.warned.add(reason)
        warnings.warn(f"vpt_fast: model.generate runs transformers' own generate for this call: {reason}. "
                      f"(This warning is shown once per reason.)", stacklevel=2)
    return state.original(*args, **kwargs)


def _accelerated(model, state: _Patch, args, kwargs, vpt_images, vpt_force):
    from . import _hf_compat

    if len(args) > 2:
        raise Fallback("positional arguments after generation_config")
    input_ids = args[0] if args else kwargs.pop("inputs", None)
    if "input_ids" in kwargs:
        if input_ids is not None:
            raise ValueError("input_ids given twice (as inputs and as input_ids)")
        input_ids = kwargs.pop("input_ids")
    generation_config = args[1] if len(args) > 1 else kwargs.pop("generation_config", None)
    streamer = kwargs.pop("streamer", None)
    tokenizer = kwargs.pop("tokenizer", None)  # what transformers reads stop_strings with
    for name in CALL_OPTIONS:
        value = kwargs.pop(name, None)
        if value is not None and not (name in ("logits_processor", "stopping_criteria") and len(value) == 0) and not (
                name == "synced_gpus" and value is False):
            raise Fallback(f"{name} is given")
    if input_ids is None:
        raise Fallback("no input_ids (inputs_embeds only)" if "inputs_embeds" in kwargs else "no input_ids")
    config, model_kwargs = _hf_compat.generation_config(model, generation_config, kwargs)
    extra = sorted(k for k, v in model_kwargs.items() if k not in MODEL_INPUTS and v is not None and v is not False)
    if extra:
        raise Fallback(f"model inputs the engine does not take: {', '.join(extra)}")
    unsupported = _hf_compat.changed_generation_options(config, HONOURED | NO_EFFECT)
    if unsupported:
        raise Fallback(f"generation options the engine does not apply: {', '.join(unsupported)}")

    engine = state.engine
    bundle, vocab = engine.bundle, engine.bundle.vocab
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype not in (torch.long, torch.int):
        raise ValueError(f"input_ids must be a (batch, length) integer tensor, got "
                         f"{type(input_ids).__name__} {tuple(getattr(input_ids, 'shape', ()))}")
    batch, length = input_ids.shape
    eos = config.eos_token_id
    eos = [] if eos is None else [int(eos)] if isinstance(eos, int) else [int(t) for t in eos]
    if vocab.im_end not in eos:
        raise Fallback(f"the end-of-sequence ids {eos} leave out <|im_end|> ({vocab.im_end}), where the engine "
                       f"always ends a round")
    pad = config.pad_token_id if config.pad_token_id is not None else eos[0]
    new_tokens = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - length
    if new_tokens < 1:
        raise Fallback(f"max_length {config.max_length} leaves no room after the {length}-token input")
    stops = config.stop_strings
    stops = () if not stops else (stops,) if isinstance(stops, str) else tuple(stops)
    if stops and tokenizer is None:
        raise ValueError("stop_strings need the tokenizer: pass tokenizer= to generate, as transformers asks")
    n = int(config.num_return_sequences or 1)
    if n > 1 and not config.do_sample:
        raise Fallback(f"num_return_sequences={n} without sampling")
    if streamer is not None and batch * n != 1:
        raise ValueError("a streamer takes a batch of one sequence")
    scored = bool(config.return_dict_in_generate and (config.output_scores or config.output_logits))
    if scored and (batch * n > 1 or bundle.vpt_config.is_vpt):
        what = ", ".join(f"{k}=True" for k in ("output_scores", "output_logits") if getattr(config, k))
        raise Fallback(f"{what} for {batch * n} sequence(s) of a {'VPT' if bundle.vpt_config.is_vpt else 'stock'} "
                       f"model (the engine returns them for one sequence of a stock model)")

    mask = model_kwargs.get("attention_mask")
    if mask is None:  # inferred as transformers infers it: from the pad id, unless it also ends sequences
        infer = pad not in eos and bool((input_ids == pad).any())
        mask = (input_ids != pad) if infer else torch.ones_like(input_ids)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask of shape {tuple(mask.shape)} for input_ids of shape {tuple(input_ids.shape)}")
    ids_cpu, mask_cpu = input_ids.detach().cpu(), mask.detach().cpu().bool()
    prompts = []
    for b in range(batch):
        kept = mask_cpu[b].nonzero().flatten()
        if kept.numel() == 0:
            raise ValueError(f"sample {b} has no tokens (its attention mask is all zeros)")
        first, last = int(kept[0]), int(kept[-1])
        if last - first + 1 != kept.numel():
            raise Fallback("an attention mask with holes (not left or right padding)")
        prompts.append(ids_cpu[b, first : last + 1].tolist())
    needed = max(len(p) for p in prompts) + new_tokens
    if needed > engine.max_seq_len and not bundle.vpt_config.is_vpt:
        raise Fallback(f"a sample needs {needed} positions; the engine was built "
                       f"with max_seq_len {engine.max_seq_len} (pass max_seq_len= to vpt_fast.accelerate)")
    images = _images(bundle, prompts, model_kwargs, vpt_images)
    forced = _forced(bundle, vpt_force, batch)

    seed = int(torch.randint(0, 2**62, (1,)).item()) if config.do_sample else 0
    jobs = []
    for b in range(batch):
        params = SamplingParams(
            max_new_tokens=new_tokens, do_sample=bool(config.do_sample),
            temperature=float(config.temperature) if config.do_sample and config.temperature else 1.0,
            top_k=int(config.top_k) if config.do_sample and config.top_k else None,
            top_p=float(config.top_p) if config.do_sample and config.top_p is not None and config.top_p < 1 else None,
            seed=seed + b, repetition_penalty=float(config.repetition_penalty or 1.0),
            stop_token_ids=tuple(t for t in eos if t != vocab.im_end), stop=stops, n=n, return_logits=scored)
        jobs.append((images[b], TokenPrompt(prompts[b]), params, forced[b]))
    results = _run(engine, jobs, streamer, input_ids, n)
    state.last_results = results
    for r in results:
        if r.finish_reason in ("error", "abort"):
            raise ValueError(f"vpt_fast: {r.error}")

    rows = []
    for i, r in enumerate(results):  # sample b's n sequences are rows b * n ... b * n + n - 1, as transformers has them
        prompt = prompts[i // n]
        if r.sequence_ids[: len(prompt)] != prompt:
            raise RuntimeError(f"vpt_fast: sample {i // n}: the conversation no longer starts with its prompt")
        rows.append(r.sequence_ids[len(prompt) :])
    width = max(len(row) for row in rows)
    out = torch.full((batch * n, length + width), pad, dtype=torch.long)
    out[:, :length] = ids_cpu.repeat_interleave(n, dim=0)
    for b, row in enumerate(rows):
        out[b, length : length + len(row)] = torch.tensor(row, dtype=torch.long)
    out = out.to(input_ids.device)
    if config.return_dict_in_generate:
        output = _hf_compat.decoder_only_output(out)
        if scored:
            logits = [row[None].to(input_ids.device) for row in results[0].logits]
            if config.output_logits:
                output.logits = tuple(logits)
            if config.output_scores:
                output.scores = _scores(config, out, length, logits)
        output.vpt_results = results
        return output
    return out


def _scores(config, sequences: torch.Tensor, length: int, logits: list[torch.Tensor]) -> tuple:
    """transformers' `scores` of one sequence: each step's raw logits through the processors the
    engine honours, as transformers applies them (the repetition penalty over the sequence so
    far, then with sampling temperature, top-k and top-p)."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper

    from . import _hf_compat

    TopK, TopP = _hf_compat.top_k_top_p_warpers()
    steps = []
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        steps.append(RepetitionPenaltyLogitsProcessor(float(config.repetition_penalty)))
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            steps.append(TemperatureLogitsWarper(float(config.temperature)))
        if config.top_k:
            steps.append(TopK(int(config.top_k)))
        if config.top_p is not None and config.top_p < 1.0:
            steps.append(TopP(float(config.top_p)))
    out = []
    for i, row in enumerate(logits):
        scores = row.clone()
        for step in steps:
            scores = step(sequences[:, : length + i], scores)
        out.append(scores)
    return tuple(out)


def _images(bundle, prompts: list[list[int]], model_kwargs: dict, vpt_images) -> list:
    """Each sample's images, a list of PixelImages (empty for a text-only sample), from
    pixel_values and image_grid_thw: the images in the order the samples show them, as the
    processor lists them."""
    from .preprocess import load_image
    from .prompt import image_list, runs

    counts = [len(runs(ids, bundle.vocab.image_pad)) for ids in prompts]
    pixels, grids = model_kwargs.get("pixel_values"), model_kwargs.get("image_grid_thw")
    if vpt_images is not None and (not isinstance(vpt_images, (list, tuple)) or len(vpt_images) != len(prompts)):
        raise ValueError(f"vpt_images must be a list with one entry per sample ({len(prompts)}): None, an image, or "
                         f"a list with one image (or None) per image of the sample")
    originals = [[None] * n for n in counts]
    if vpt_images is not None:
        for b, (n, given) in enumerate(zip(counts, vpt_images)):
            given = image_list(given)
            if given and len(given) != n:
                raise ValueError(f"vpt_images gives {len(given)} image(s) for sample {b}, which holds {n}")
            originals[b] = [None if im is None else load_image(im) for im in given] or originals[b]
    wanted = sum(counts)
    if wanted == 0:
        if pixels is not None:
            raise ValueError("pixel_values given, but no sample holds image pad tokens")
        return [[] for _ in prompts]
    if pixels is None or grids is None:
        raise ValueError(f"the samples hold {wanted} image(s) (image pad runs) but pixel_values / image_grid_thw "
                         f"are missing")
    grids = grids.detach().cpu().long()
    if grids.ndim != 2 or grids.shape != (wanted, 3):
        raise ValueError(f"image_grid_thw of shape {tuple(grids.shape)} for {wanted} image(s): expected ({wanted}, 3)")
    sizes = grids.prod(-1).tolist()
    if pixels.ndim != 2 or pixels.shape[0] != sum(sizes):
        raise ValueError(f"pixel_values of shape {tuple(pixels.shape)}: image_grid_thw accounts for {sum(sizes)} rows")
    out, k, row = [], 0, 0
    for b, n in enumerate(counts):
        images = []
        for picture in originals[b]:
            try:
                images.append(PixelImage.from_rows(pixels[row : row + sizes[k]], grids[k].tolist(),
                                                   bundle.processor.qwen, picture))
            except ValueError as e:
                raise ValueError(f"image {k} (sample {b}): {e}") from None
            row += sizes[k]
            k += 1
        out.append(images)
    return out


def _forced(bundle, vpt_force, batch: int) -> list:
    if vpt_force is None:
        return [None] * batch

    def ids(value):
        if value is None:
            return None
        if isinstance(value, str):
            return encode(bundle.tokenizer, value)
        return [int(t) for t in value]

    if isinstance(vpt_force, str) or (isinstance(vpt_force, (list, tuple)) and all(isinstance(t, int) for t in vpt_force)):
        return [ids(vpt_force)] * batch
    if not isinstance(vpt_force, (list, tuple)) or len(vpt_force) != batch:
        raise ValueError(f"vpt_force must be token ids or text for every sample, or a list of {batch} of them")
    return [ids(v) for v in vpt_force]


def _run(engine, jobs, streamer, input_ids, n: int = 1) -> list:
    """Every sequence's result, sample by sample (a sample's n in a row)."""
    from .engine.state import FinishEvent, TokenEvent

    results = [None] * (len(jobs) * n)
    if streamer is not None:
        streamer.put(input_ids.detach().cpu())
    for event in engine._batch(jobs, label="sample"):
        if isinstance(event, FinishEvent):
            results[event.request * n + event.index] = event.result
        elif streamer is not None and isinstance(event, TokenEvent):
            streamer.put(torch.tensor([event.token_id]))
    if streamer is not None:
        streamer.end()
    return results
