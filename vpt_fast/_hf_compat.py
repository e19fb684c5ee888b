"""Every transformers internal vpt_fast touches, in one place.

Supported: transformers >=5.17,<6 (CI runs the suite on 5.17 and the published-output and
engine tests again on the newest 5.x). Anything here that a release moves or renames is
mended here, not at the call sites.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

SUPPORTED = ">=5.17,<6"


def no_init_weights():
    """Context in which transformers modules skip their random initialisation."""
    try:
        from transformers.initialization import no_init_weights as context
    except ImportError:  # its home before 5.x moved it
        from transformers.modeling_utils import no_init_weights as context
    return context()


# ----------------------------------------------------------------------------- dtypes


def float32_patterns(module: nn.Module, dtype: torch.dtype) -> tuple[str, ...]:
    """Names of submodules whose parameters transformers' `from_pretrained(dtype=dtype)`
    keeps in float32: `_keep_in_fp32_modules` for float16, `_keep_in_fp32_modules_strict`
    for float16 and bfloat16, gathered over every transformers submodule."""
    names: set[str] = set()
    for m in module.modules():
        if dtype == torch.float16:
            names.update(getattr(m, "_keep_in_fp32_modules", None) or ())
        if dtype in (torch.float16, torch.bfloat16):
            names.update(getattr(m, "_keep_in_fp32_modules_strict", None) or ())
    return tuple(sorted(names))


@torch.no_grad()
def cast_like_from_pretrained(module: nn.Module, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """Move `module` to `device` and cast it to `dtype` the way transformers'
    `from_pretrained(dtype=dtype)` leaves a model: floating parameters and persistent
    floating buffers (what a checkpoint holds) in `dtype`, except the parameters of the
    modules transformers keeps in float32 (`float32_patterns`); non-persistent buffers
    (rotary inverse frequencies, computed in float32 at construction) keep their dtype.
    A plain `module.to(dtype)` would cast those too: bf16 inverse frequencies put M-RoPE
    angles off by about a radian at position 1,500. Tied parameters stay tied. Returns
    `module`."""
    import re

    module.to(device)
    keep = float32_patterns(module, dtype)
    keep_re = re.compile(r"(^|\.)(" + "|".join(re.escape(k) for k in keep) + r")(\.|$)") if keep else None
    for name, p in module.named_parameters():  # each shared tensor once, under its first name
        if p.is_floating_point():
            target = torch.float32 if keep_re is not None and keep_re.search(name) else dtype
            p.data = p.data.to(target)
    for m in module.modules():
        for name, b in m._buffers.items():
            if b is not None and b.is_floating_point() and name not in m._non_persistent_buffers_set:
                m._buffers[name] = b.to(dtype)
    return module


# ----------------------------------------------------------------------------- model parts


def text_model(model: nn.Module) -> nn.Module:
    """The language model (embeddings, decoder layers, final norm) of a Qwen2VLForConditionalGeneration."""
    return model.model.language_model


def vision_tower(model: nn.Module) -> nn.Module:
    return model.model.visual


def is_qwen2_vl(model) -> bool:
    return hasattr(model, "model") and hasattr(model.model, "language_model") and hasattr(model, "lm_head")


def rotary_embedding(text: nn.Module) -> nn.Module:
    """The text model's M-RoPE module: (x, positions (3, B, T)) -> cos, sin (B, T, head_dim)."""
    return text.rotary_emb


@torch.no_grad()
def vision_features(model: nn.Module, pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Merged visual tokens (sum N, hidden) of images given as processor rows and grid_thw."""
    return vision_tower(model)(pixels, grid_thw=grid).pooler_output


def rope_index(model: nn.Module, ids: torch.Tensor, mm_token_type_ids: torch.Tensor, grids: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
    """transformers' own 3-D positions (3, B, L) of a padded batch with images."""
    positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=grids,
                                              attention_mask=mask)
    return positions


@functools.cache
def _cache_keyword(forward) -> str:
    """The name under which the text model's forward takes its KV cache ("cache" since 5.24)."""
    parameters = inspect.signature(forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def text_forward(text: nn.Module, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
    """The text model over input embeddings, appending to `cache`; final hidden states."""
    keyword = _cache_keyword(type(text).forward)
    return text(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                **{keyword: cache}).last_hidden_state


def dynamic_cache(config):
    from transformers import DynamicCache

    return DynamicCache(config=config)


def crop_cache(cache, length: int) -> None:
    """Drop cache entries from `length` on (negative: that many from the end)."""
    cache.crop(length)


# ----------------------------------------------------------------------------- the branches


def dinov2_model(config):
    from transformers import Dinov2Model

    return Dinov2Model(config)


def sam_vision_encoder(config):
    from transformers.models.sam.modeling_sam import SamVisionEncoder

    return SamVisionEncoder(config)


# DINOv2 attention weights: transformers 4.45 names (released checkpoints) and the names some 5.x
# releases use; the loader renames towards the module's own.
DINOV2_ATTENTION_NAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def match_dinov2_names(state: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """DINOv2 weights renamed to the naming `module` uses, whichever of the two they come in."""
    own = set(module.state_dict())
    if any(new in k for k in own for _, new in DINOV2_ATTENTION_NAMES):
        pairs = DINOV2_ATTENTION_NAMES
    else:
        pairs = tuple((new, old) for old, new in DINOV2_ATTENTION_NAMES)
    out = {}
    for k, v in state.items():
        for a, b in pairs:
            k = k.replace(a, b)
        out[k] = v
    return out


# ----------------------------------------------------------------------------- tokenizer, sampling, logs


def special_token_texts(tokenizer) -> set[str]:
    """The text of every special token the tokenizer parses out of a string."""
    texts = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return texts | set(tokenizer.all_special_tokens)


def top_k_top_p_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    return TopKLogitsWarper, TopPLogitsWarper


def quiet_transformers() -> None:
    """Only errors from transformers' logger (its config notices are not for a terminal user)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


# ----------------------------------------------------------------------------- generate


def generation_config(model, config, kwargs: dict):
    """(the GenerationConfig a `model.generate(generation_config=config, **kwargs)` call runs
    with, the keyword arguments left for the model), merged as transformers' generate merges
    them (the call's options over `model.generation_config` over the global defaults)."""
    return model._prepare_generation_config(config, **kwargs)


def changed_generation_options(config, allowed: set[str]) -> list[str]:
    """The options of `config` outside `allowed` that differ from their defaults, as "name=value"."""
    from transformers import GenerationConfig

    defaults = GenerationConfig()
    base = {**defaults.to_dict(), **defaults._get_default_generation_params()}
    changed = []
    for name, value in config.to_dict().items():
        if name in allowed or value == base.get(name) or (not value and not base.get(name)):
            continue  # honoured, or at its default (None, False and 0 all meaning off)
        changed.append(f"{name}={value!r}")
    return sorted(changed)


def decoder_only_output(sequences: torch.Tensor):
    """transformers' `GenerateDecoderOnlyOutput` holding only the sequences."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    return GenerateDecoderOnlyOutput(sequences=sequences)
