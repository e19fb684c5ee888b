"""Small random VPT checkpoints in the RELEASED format, built offline.

`make_tiny_checkpoint(path, variant)` writes what a released VPT checkpoint holds,
at toy sizes: a transformers-4.45-style flat config.json (`model_type:
"qwen2_vl_vpt"`), `pytorch_model.bin` with 4.45 key names, a byte-level BPE
tokenizer trained here on a few sentences that holds every Qwen2-VL special token
and every VPT token, and the processor config. The DINOv2 / SAM branches are tiny
and described by `vpt_detection_config` / `vpt_seg_config` in config.json.

Weights are drawn wider than transformers' default init: with the default a tiny
model repeats one token whatever the input, which would make every equality test
between two pipelines meaningless.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from . import spec
from .preprocess import QwenImageConfig

VARIANTS = ("region", "clip", "dino", "sam")  # the VPT checkpoints; "plain" is a stock Qwen2-VL one

# Qwen2-VL's chat template (ChatML with the default system prompt; an image part is one
# `<|image_pad|>` inside its vision span, which the processor expands to the image's tokens)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n" + spec.SYSTEM_PROMPT + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768, hidden_act="silu",
)
MROPE_SECTION = [2, 3, 3]  # head_dim 16 -> 8 rotary frequencies
VISION = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, in_chans=3, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu")
DINO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=224, patch_size=14,
            num_channels=3, qkv_bias=True, layerscale_value=1.0, hidden_act="gelu", layer_norm_eps=1e-6)
SAM = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, output_channels=32, image_size=1024,
           patch_size=16, num_channels=3, mlp_dim=64, window_size=8, global_attn_indexes=[1], qkv_bias=True,
           use_abs_pos=True, use_rel_pos=True, layer_norm_eps=1e-6, hidden_act="gelu")
VOCAB_SIZE = 400
MAX_PIXELS = 1003520

_CORPUS = """You are a helpful assistant.
Identify the region that can help you answer the question, and then answer the question.
Require additional perception features, and then answer the question.
What is the color of the car? How many people are in the picture? What does the sign say?
Is there a dog on the left side of the image? Describe the image in one sentence.
The answer is red. There are three people. The sign says stop. Yes, a small brown dog.
Answer the question using a single word or phrase. Region 0: Region 1: Region 2:
A man is riding a bicycle on a street next to a tall building with many windows.
"""


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = list(spec.QWEN_SPECIAL_TOKENS) + list(spec.VPT_TOKENS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    return tok


def build_tokenizer():
    """The tiny tokenizer as a transformers fast tokenizer (Qwen2-VL conventions)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(), eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=list(spec.QWEN_SPECIAL_TOKENS) + list(spec.VPT_TOKENS),
        clean_up_tokenization_spaces=False, model_max_length=32768,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _widen_(module: nn.Module, generator: torch.Generator) -> None:
    """Redraw weights with unit-gain variance so that outputs depend on the input."""
    for name, p in module.named_parameters():
        with torch.no_grad():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
            else:  # norm gains, layer scales, class tokens
                p.copy_(1.0 + torch.randn(p.shape, generator=generator) * 0.1)


def _to_445_key(key: str) -> str:
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return key[len("model."):]
    return key


def make_tiny_checkpoint(path: str | Path, variant: str = "region", seed: int = 0, tie_word_embeddings: bool = False) -> Path:
    """Write a small random VPT checkpoint in the released format; returns the folder.

    variant: "region" (VPT tokens, no re-encoding branch, one inner pass), "clip",
    "dino" or "sam" (that branch plus region tokens, two inner passes), or "plain": a stock
    Qwen2-VL checkpoint (no VPT fields, `model_type: "qwen2_vl"`, both end-of-sequence ids in
    generation_config.json, as the released Qwen2-VL-Instruct has) that transformers loads
    with `Qwen2VLForConditionalGeneration.from_pretrained`.
    """
    from transformers import Dinov2Config, Qwen2VLForConditionalGeneration, SamVisionConfig

    from . import _hf_compat

    from .checkpoint import _qwen2vl_config
    from .projectors import ClipProjector, DetectionProjector, SegProjector

    if variant not in VARIANTS + ("plain",):
        raise ValueError(f"variant must be one of {VARIANTS + ('plain',)}, got {variant!r}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    if len(tokenizer) > VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer grew to {len(tokenizer)} > {VOCAB_SIZE}")

    config = dict(
        architectures=["VPT_Qwen2VLForConditionalGeneration"], model_type="qwen2_vl_vpt", **TEXT,
        vocab_size=VOCAB_SIZE, rope_scaling={"type": "mrope", "mrope_section": MROPE_SECTION},
        vision_config=dict(VISION), bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"), image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=tie_word_embeddings, use_sliding_window=False, sliding_window=4096, max_window_layers=80,
        attention_dropout=0.0, initializer_range=0.02, use_cache=True, torch_dtype="float32", transformers_version="4.45.2",
        para_start_id=None, para_end_id=None, num_inner_forward_run=1 if variant == "region" else 2, projector_scale=1,
        para_mask_id=0, para_mask_ratio=0.0, alignment=False, vision_encoder_ls=[] if variant == "region" else [variant],
    )
    for kind, prefix in (("dino", "detection"), ("clip", "clip"), ("sam", "seg")):
        start, action, _end, pad = spec.ACTION_TOKENS[kind]
        on = kind == variant
        config[f"{prefix}_image_token_id"] = ids(pad) if on else None
        config[f"{prefix}_action_id"] = ids(action) if on else None
        config[f"{prefix}_action_start_id"] = ids(start) if on else None
    eos = config["eos_token_id"]
    if variant == "plain":
        vpt_fields = ("para_start_id", "para_end_id", "num_inner_forward_run", "projector_scale", "para_mask_id",
                      "para_mask_ratio", "alignment", "vision_encoder_ls")
        branch_ids = ("_image_token_id", "_action_id", "_action_start_id")  # detection_image_token_id, ...
        config = {k: v for k, v in config.items() if k not in vpt_fields and not k.endswith(branch_ids)}
        config.update(architectures=["Qwen2VLForConditionalGeneration"], model_type="qwen2_vl")
        eos = [config["eos_token_id"], config["pad_token_id"]]

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(_qwen2vl_config(config))
    _widen_(model, g)
    if tie_word_embeddings:
        model.lm_head.weight = _hf_compat.text_model(model).embed_tokens.weight
    state = {_to_445_key(k): v for k, v in model.state_dict().items()}
    if tie_word_embeddings:
        del state["lm_head.weight"]

    hidden = TEXT["hidden_size"]
    if variant == "clip":
        parts = {"clip_projector": ClipProjector(hidden)}
    elif variant == "dino":
        config["vpt_detection_config"] = dict(DINO)
        parts = {"detection_model": _hf_compat.dinov2_model(Dinov2Config(**DINO)),
                 "detection_projector": DetectionProjector(DINO["hidden_size"], hidden)}
    elif variant == "sam":
        config["vpt_seg_config"] = dict(SAM)
        parts = {"seg_model": _hf_compat.sam_vision_encoder(SamVisionConfig(**SAM)),
                 "seg_projector": SegProjector(SAM["output_channels"], hidden)}
    else:
        parts = {}
    for prefix, module in parts.items():
        _widen_(module, g)
        state.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})

    torch.save({k: v.contiguous() for k, v in state.items()}, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(dict(
        bos_token_id=config["bos_token_id"], eos_token_id=eos, pad_token_id=config["pad_token_id"],
        transformers_version="4.45.2")))
    (folder / "preprocessor_config.json").write_text(json.dumps(QwenImageConfig(max_pixels=MAX_PIXELS).to_dict(), indent=2))
    tokenizer.save_pretrained(str(folder))
    return folder


def demo_checkpoint(variant: str = "region") -> Path:
    """A tiny random checkpoint in the user's cache folder (see `vpt_fast._cache`), built on
    first use and reused after; its folder name carries a hash of this module, so a changed
    builder makes a new one."""
    import hashlib

    from ._cache import build_once, cache_dir

    if variant not in VARIANTS + ("plain",):
        raise ValueError(f"variant must be one of {VARIANTS + ('plain',)}, got {variant!r}")
    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    folder = cache_dir() / "demo" / f"tiny-{variant}-{digest}"
    build_once(folder, lambda private: make_tiny_checkpoint(private, variant))
    return folder
