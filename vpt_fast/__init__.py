"""vpt_fast: single-pass Visual Perception Token inference for Qwen2-VL.

    engine = vpt_fast.from_pretrained("/path/to/Qwen2-VL-2b-VPT-Det")
    (result,) = engine.generate(["photo.jpg"], ["<image>\\nWhat is written on the sign?"])
    result.text, result.trace   # the answer, and what the model looked at
"""

from __future__ import annotations

import os
import warnings

import torch

from . import ops
from .engine import AsyncEngine, Engine, GenerationResult
from .sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["AsyncEngine", "Engine", "GenerationResult", "SamplingParams", "accelerate", "from_pretrained", "last_results",
           "ops", "restore"]


def from_pretrained(path_or_model, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
                    **options) -> Engine:
    """An Engine for a checkpoint folder (released VPT format, transformers-5 layout or
    plain Qwen2-VL), or for an already loaded transformers model (then as `accelerate`).

    dtype: torch.float32, bfloat16 or float16, or its name ("bfloat16"); device: "cpu" or
    a CUDA device; anything else raises ValueError before any weight is read. options go
    to `Engine` (max_seq_len, default min(4096, the model's max_position_embeddings),
    max_batch_size, kv_cache_tokens or kv_cache_gib, block_size, cuda_graphs, capture_graphs,
    image_pipeline); a max_seq_len above the model's max_position_embeddings raises ValueError
    too. The load keeps in float32 what transformers' from_pretrained keeps in float32 (the
    rotary inverse frequencies among them)."""
    if isinstance(path_or_model, (str, os.PathLike)):
        from .checkpoint import load_vpt_checkpoint

        return Engine(load_vpt_checkpoint(path_or_model, dtype=dtype, device=device), **options)
    return accelerate(path_or_model, patch=False, **options)


def accelerate(hf_model, processor, *, patch: bool = True, strict: bool = False, clip_projector=None,
               detection_model=None, detection_projector=None, seg_model=None, seg_projector=None, vpt_config=None,
               **options) -> Engine:
    """Run a loaded transformers `Qwen2VLForConditionalGeneration` (a plain Qwen2-VL or a VPT
    checkpoint's model) on the engine; returns the Engine.

    patch: replace `generate` on this model instance (never on its class) so that the usual
    `model.generate(**processor(...), max_new_tokens=...)` runs on the engine and returns
    what transformers returns (see `vpt_fast.dropin`); `vpt_fast.restore(model)` undoes it.
    Calls the engine cannot honour (beam search, custom logits processors, ...) go to
    transformers' generate with a one-time warning naming why; strict=True raises instead.
    With patch=False the model is left as it is.

    processor: a transformers Qwen2-VL processor (its tokenizer and image processor are
    used) or a tokenizer alone (then the image settings follow the model's vision config:
    patch, merge and temporal patch sizes; the pixel bounds and normalisation are Qwen2-VL's). VPT branches are passed as the
    modules the checkpoint would hold; vpt_config (a `VPTConfig` or the VPT fields of a
    checkpoint's config.json) says which token ids drive them, and defaults to the
    fields found in `hf_model.config`. options go to `Engine` (max_seq_len,
    max_batch_size, kv_cache_gib, ...).
    """
    from . import spec
    from .checkpoint import VPTBundle, VPTConfig
    from .preprocess import QwenImageConfig, VPTImageProcessor

    from . import _hf_compat

    if not _hf_compat.is_qwen2_vl(hf_model):
        raise TypeError(f"accelerate expects a transformers Qwen2VLForConditionalGeneration, got {type(hf_model).__name__}")
    tokenizer = getattr(processor, "tokenizer", processor)
    if not hasattr(tokenizer, "get_vocab"):
        raise TypeError(f"processor must be a Qwen2-VL processor or a tokenizer, got {type(processor).__name__}")
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is not None:
        qwen = QwenImageConfig.from_dict(image_processor.to_dict())
    else:
        qwen = QwenImageConfig.from_vision_config(hf_model.config.vision_config)
    if vpt_config is None:
        vcfg = VPTConfig.from_dict(hf_model.config.to_dict())
    elif isinstance(vpt_config, VPTConfig):
        vcfg = vpt_config
    else:
        vcfg = VPTConfig.from_dict(dict(vpt_config))
    branches = {"clip": clip_projector, "dino": detection_projector, "sam": seg_projector}
    for kind, module in branches.items():
        if module is not None and vcfg.ids(kind)[1] is None:
            raise ValueError(f"a {kind} projector was given but vpt_config names no {kind} action token ids")
    if (detection_projector is None) != (detection_model is None) or (seg_projector is None) != (seg_model is None):
        raise ValueError("give each re-encoding encoder together with its projector (detection_model with "
                         "detection_projector, seg_model with seg_projector)")
    for kind in vcfg.vision_encoder_ls:
        if branches[kind] is None:
            from .perception import BRANCH_MODULES

            warnings.warn(f"vpt_config names the {kind} branch (vision_encoder_ls {list(vcfg.vision_encoder_ls)}) but "
                          f"{' and '.join(m + '=' for m in BRANCH_MODULES[kind])} was not given: requests where the "
                          f"model asks for {kind} re-encoding will finish 'unsupported:{kind}'", stacklevel=2)
    bundle = VPTBundle(model=hf_model, tokenizer=tokenizer, processor=VPTImageProcessor(qwen=qwen),
                       vpt_config=vcfg, vocab=spec.Vocab.from_tokenizer(tokenizer), clip_projector=clip_projector,
                       detection_model=detection_model, detection_projector=detection_projector, seg_model=seg_model,
                       seg_projector=seg_projector)
    engine = Engine(bundle, **options)
    if patch:
        from .dropin import patch as patch_generate

        patch_generate(hf_model, engine, strict=strict)
    return engine


def restore(hf_model):
    """Give a model patched by `accelerate` its own `generate` back (the very method it had);
    a model that is not patched is left as it is. Returns the model."""
    from .dropin import restore as restore_generate

    return restore_generate(hf_model)


def last_results(hf_model) -> list[GenerationResult]:
    """The GenerationResults (perception traces, finish reasons, answer texts) of the last
    `generate` call of a model patched by `accelerate`, one per sample."""
    from .dropin import last_results as results

    return results(hf_model)
