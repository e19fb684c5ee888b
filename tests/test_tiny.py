"""The tiny checkpoints of vpt_fast.tiny: released layout, usable tokenizer, input-dependent weights."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from vpt_fast import spec
from vpt_fast.tiny import VARIANTS, make_tiny_checkpoint

VPT_ID_FIELDS = tuple(
    f"{prefix}_{field}"
    for prefix in ("detection", "clip", "seg")
    for field in ("image_token_id", "action_id", "action_start_id")
)
VPT_FIELDS = VPT_ID_FIELDS + (
    "para_start_id", "para_end_id", "num_inner_forward_run", "projector_scale", "para_mask_id",
    "para_mask_ratio", "alignment", "vision_encoder_ls",
)
PREFIX = {"clip": "clip", "dino": "detection", "sam": "seg"}
BRANCH_WEIGHTS = {
    "region": (),
    "clip": ("clip_projector.",),
    "dino": ("detection_model.", "detection_projector."),
    "sam": ("seg_model.", "seg_projector."),
}


def read_config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def read_weights(folder) -> dict[str, torch.Tensor]:
    return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("variant", VARIANTS)
def test_tokenizer_round_trips_special_tokens(tiny_ckpt, variant):
    tok = AutoTokenizer.from_pretrained(str(tiny_ckpt(variant)), local_files_only=True)
    seen = {}
    for token in spec.VPT_TOKENS + spec.QWEN_SPECIAL_TOKENS:
        ids = tok.encode(token, add_special_tokens=False)
        assert len(ids) == 1, (token, ids)
        assert tok.convert_tokens_to_ids(token) == ids[0]
        assert tok.decode(ids) == token
        assert ids[0] not in seen, (token, seen.get(ids[0]))
        seen[ids[0]] = token
    assert tok.eos_token == spec.IM_END
    # plain text around the tokens still splits into them
    text = f"{spec.IM_START}user\nWhat is it?{spec.REGION_START}<|x_3|><|y_5|>{spec.REGION_END}{spec.IM_END}"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    for token in (spec.IM_START, spec.REGION_START, "<|x_3|>", "<|y_5|>", spec.REGION_END, spec.IM_END):
        assert tok.convert_tokens_to_ids(token) in ids


# ----------------------------------------------------------------------------- config / weights layout


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_has_the_445_flat_layout_and_vpt_fields(tiny_ckpt, variant):
    cfg = read_config(tiny_ckpt(variant))
    assert cfg["model_type"] == "qwen2_vl_vpt"
    assert cfg["architectures"] == ["VPT_Qwen2VLForConditionalGeneration"]
    assert "text_config" not in cfg
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "rope_theta"):
        assert key in cfg
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    section = cfg["rope_scaling"]["mrope_section"]
    assert len(section) == 3 and sum(section) == head_dim // 2
    assert cfg["rope_scaling"]["type"] == "mrope"
    assert "in_chans" in cfg["vision_config"] and "in_channels" not in cfg["vision_config"]
    for key in VPT_FIELDS:
        assert key in cfg, key

    tok = AutoTokenizer.from_pretrained(str(tiny_ckpt(variant)), local_files_only=True)
    for name, token in (
        ("image_token_id", spec.IMAGE_PAD), ("vision_start_token_id", spec.VISION_START),
        ("vision_end_token_id", spec.VISION_END), ("eos_token_id", spec.IM_END),
    ):
        assert cfg[name] == tok.convert_tokens_to_ids(token)
    if variant == "region":
        assert cfg["num_inner_forward_run"] == 1 and cfg["vision_encoder_ls"] == []
        assert all(cfg[k] is None for k in VPT_ID_FIELDS)
    else:
        assert cfg["num_inner_forward_run"] == 2 and cfg["vision_encoder_ls"] == [variant]
        start, action, _end, pad = spec.ACTION_TOKENS[variant]
        p = PREFIX[variant]
        assert cfg[f"{p}_action_start_id"] == tok.convert_tokens_to_ids(start)
        assert cfg[f"{p}_action_id"] == tok.convert_tokens_to_ids(action)
        assert cfg[f"{p}_image_token_id"] == tok.convert_tokens_to_ids(pad)
        others = [k for k in VPT_ID_FIELDS if not k.startswith(p + "_")]
        assert all(cfg[k] is None for k in others)
    assert ("vpt_detection_config" in cfg) == (variant == "dino")
    assert ("vpt_seg_config" in cfg) == (variant == "sam")


@pytest.mark.parametrize("variant", VARIANTS)
def test_weights_use_445_key_names(tiny_ckpt, variant):
    keys = list(read_weights(tiny_ckpt(variant)))
    assert not [k for k in keys if k.startswith(("model.language_model.", "model.visual."))]
    assert "model.embed_tokens.weight" in keys
    assert "model.norm.weight" in keys
    assert "lm_head.weight" in keys  # untied by default
    assert any(k.startswith("model.layers.0.self_attn.q_proj.") for k in keys)
    assert any(k.startswith("visual.blocks.0.") for k in keys)
    assert any(k.startswith("visual.merger.") for k in keys)
    known = ("model.", "lm_head.", "visual.") + BRANCH_WEIGHTS[variant]
    assert all(k.startswith(known) for k in keys), [k for k in keys if not k.startswith(known)]
    for prefix in BRANCH_WEIGHTS[variant]:
        assert any(k.startswith(prefix) for k in keys), prefix


# ----------------------------------------------------------------------------- weights that matter


def greedy(model, prompt: list[int], steps: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, use_cache=False).logits
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


@pytest.mark.parametrize("variant", ["region", "clip"])
def test_greedy_outputs_depend_on_the_input(tiny_bundle, variant):
    bundle = tiny_bundle(variant)
    tok = bundle.tokenizer
    special = set(tok.all_special_ids) | {tok.convert_tokens_to_ids(t) for t in spec.VPT_TOKENS}
    plain = torch.tensor([i for i in range(len(tok)) if i not in special])
    g = torch.Generator().manual_seed(1234)
    continuations = []
    for _ in range(4):
        prompt = plain[torch.randint(len(plain), (10,), generator=g)].tolist()
        cont = greedy(bundle.model, prompt, steps=8)
        assert len(set(cont)) > 1, cont
        continuations.append(tuple(cont))
    assert len(set(continuations)) == len(continuations), continuations


# ----------------------------------------------------------------------------- determinism


def _tensor_bytes(folder) -> dict[str, bytes]:
    return {k: v.contiguous().numpy().tobytes() for k, v in read_weights(folder).items()}


@pytest.mark.parametrize("variant", ["region", "sam"])
def test_deterministic_for_a_seed(tmp_path, tiny_ckpt, variant):
    again = _tensor_bytes(make_tiny_checkpoint(tmp_path / "again", variant, seed=0))
    first = _tensor_bytes(tiny_ckpt(variant))
    assert again.keys() == first.keys()
    assert all(again[k] == first[k] for k in first)
    assert read_config(tmp_path / "again") == read_config(tiny_ckpt(variant))

    other = _tensor_bytes(make_tiny_checkpoint(tmp_path / "other", variant, seed=1))
    assert other.keys() == first.keys()
    differ = [k for k in first if other[k] != first[k]]
    assert "model.embed_tokens.weight" in differ and "lm_head.weight" in differ
    for prefix in BRANCH_WEIGHTS[variant]:
        assert any(k.startswith(prefix) for k in differ), prefix


def test_unknown_variant(tmp_path):
    with pytest.raises(ValueError, match=r"variant must be one of .*got 'owl'"):
        make_tiny_checkpoint(tmp_path / "x", "owl")
    assert not (tmp_path / "x").exists()


def test_the_plain_checkpoint_is_stock_qwen2_vl(tiny_ckpt):
    from transformers import Qwen2VLForConditionalGeneration

    from vpt_fast.checkpoint import load_vpt_checkpoint

    folder = tiny_ckpt("plain")
    cfg = read_config(folder)
    assert cfg["model_type"] == "qwen2_vl" and cfg["architectures"] == ["Qwen2VLForConditionalGeneration"]
    assert not [k for k in VPT_FIELDS if k in cfg]
    model = Qwen2VLForConditionalGeneration.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert model.generation_config.eos_token_id == [tok.convert_tokens_to_ids(spec.IM_END),
                                                    tok.convert_tokens_to_ids("<|endoftext|>")]
    bundle = load_vpt_checkpoint(folder)
    assert bundle.vpt_config.is_vpt is False
    ours = bundle.model.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in model.state_dict().items())
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == (f"{spec.IM_START}system\n{spec.SYSTEM_PROMPT}{spec.IM_END}\n{spec.IM_START}user\n"
                    f"{spec.VISION_START}{spec.IMAGE_PAD}{spec.VISION_END}Hi{spec.IM_END}\n{spec.IM_START}assistant\n")
