"""vpt_fast.checkpoint: released checkpoints (docs/vpt.md §3) into transformers 5 modules.

Round trips are checked against an independent path: a transformers Qwen2-VL model built
here from a config written by hand from config.json, with the weights of the checkpoint file
renamed here from the transformers 4.45 names.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import Dinov2Config, Dinov2Model, Qwen2VLConfig, Qwen2VLForConditionalGeneration, SamVisionConfig
from transformers.models.sam.modeling_sam import SamVisionEncoder

from paths import ORIGINAL
from vpt_fast import spec
from vpt_fast.checkpoint import CheckpointError, VPTConfig, load_vpt_checkpoint
from vpt_fast.tiny import VARIANTS, make_tiny_checkpoint

TOL = 1e-5
BRANCH_PREFIXES = ("clip_projector.", "detection_model.", "detection_projector.", "seg_model.", "seg_projector.")
PROJECTOR = {"clip": "clip_projector", "dino": "detection_projector", "sam": "seg_projector"}
ENCODER = {"dino": "detection_model", "sam": "seg_model"}
CONFIG_PREFIX = {"clip": "clip", "dino": "detection", "sam": "seg"}
VPT_FIELDS = tuple(f for f in VPTConfig.__dataclass_fields__ if f != "is_vpt")
DINO_V5_NAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)
WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors", "pytorch_model.bin.index.json", "model.safetensors.index.json")


# ----------------------------------------------------------------------------- helpers


def read_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def write_config(folder: Path, cfg: dict) -> None:
    (Path(folder) / "config.json").write_text(json.dumps(cfg, indent=2))


def read_bin(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(folder) / "pytorch_model.bin", map_location="cpu", weights_only=True)


def write_bin(folder: Path, sd: dict[str, torch.Tensor]) -> None:
    torch.save({k: v.contiguous() for k, v in sd.items()}, Path(folder) / "pytorch_model.bin")


def to_v5_key(key: str) -> str:
    """transformers 4.45 Qwen2-VL key -> transformers 5 key."""
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    if key.startswith("visual."):
        return "model." + key
    return key


def copy_without_weights(src: Path, dst: Path) -> Path:
    """Every file of a checkpoint folder except its weights."""
    dst.mkdir(parents=True)
    for f in Path(src).iterdir():
        if f.name not in WEIGHT_FILES and not f.name.startswith("pytorch_model-"):
            shutil.copy(f, dst / f.name)
    return dst


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def hand_config(cfg: dict) -> Qwen2VLConfig:
    """A transformers 5 Qwen2-VL config written field by field from a 4.45 flat config.json."""
    text = {
        k: cfg[k]
        for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "use_sliding_window",
            "sliding_window", "max_window_layers", "attention_dropout", "bos_token_id", "eos_token_id",
            "pad_token_id",
        )
    }
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": cfg["rope_theta"],
        "mrope_section": list(cfg["rope_scaling"]["mrope_section"]),
    }
    v = cfg["vision_config"]  # 4.45 defaults for the fields the published config leaves out
    vision = dict(
        depth=v["depth"], embed_dim=v["embed_dim"], hidden_size=v["hidden_size"], num_heads=v["num_heads"],
        mlp_ratio=v["mlp_ratio"], in_channels=v["in_chans"], patch_size=v.get("patch_size", 14),
        spatial_merge_size=v.get("spatial_merge_size", 2), temporal_patch_size=v.get("temporal_patch_size", 2),
        hidden_act=v.get("hidden_act", "quick_gelu"),
    )
    return Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=cfg["image_token_id"],
        video_token_id=cfg["video_token_id"], vision_start_token_id=cfg["vision_start_token_id"],
        vision_end_token_id=cfg["vision_end_token_id"], tie_word_embeddings=cfg["tie_word_embeddings"],
    )


def hand_model(folder: Path) -> Qwen2VLForConditionalGeneration:
    """Qwen2-VL built here from config.json and pytorch_model.bin, independently of vpt_fast.checkpoint."""
    cfg = read_config(folder)
    sd = {to_v5_key(k): v for k, v in read_bin(folder).items() if not k.startswith(BRANCH_PREFIXES)}
    model = Qwen2VLForConditionalGeneration(hand_config(cfg)).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert unexpected == []
    if cfg["tie_word_embeddings"]:
        assert "lm_head.weight" not in sd and set(missing) <= {"lm_head.weight"}
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    else:
        assert missing == []
    return model


def random_image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def plain_ids(tokenizer) -> torch.Tensor:
    special = set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids(t) for t in spec.VPT_TOKENS}
    return torch.tensor([i for i in range(len(tokenizer)) if i not in special])


def text_inputs(bundle, seed: int = 0) -> dict:
    plain = plain_ids(bundle.tokenizer)
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": plain[torch.randint(len(plain), (2, 13), generator=g)]}


def image_inputs(bundle, seed: int = 0) -> dict:
    """A chat-like sequence with two images of different sizes."""
    images = [random_image(seed, (100, 70)), random_image(seed + 1, (60, 60))]
    pixel_values, grid = bundle.processor.qwen_inputs(images)
    plain = plain_ids(bundle.tokenizer)
    g = torch.Generator().manual_seed(seed)
    v = bundle.vocab
    ids = [v.im_start] + plain[torch.randint(len(plain), (4,), generator=g)].tolist()
    for thw in grid.tolist():
        n = thw[0] * thw[1] * thw[2] // 4
        ids += [v.vision_start] + [v.image_pad] * n + [v.vision_end]
        ids += plain[torch.randint(len(plain), (3,), generator=g)].tolist()
    input_ids = torch.tensor([ids])
    return dict(
        input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid,
        mm_token_type_ids=(input_ids == v.image_pad).int(),
    )


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def assert_same_modules(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ----------------------------------------------------------------------------- published checkpoints


@pytest.mark.parametrize("name", ["region", "clip"])
def test_published_checkpoints_load(name):
    folder = ORIGINAL / name
    cfg = read_config(folder)
    bundle = load_vpt_checkpoint(folder)
    vcfg = bundle.vpt_config
    assert vcfg.is_vpt
    for f in VPT_FIELDS:
        expected = cfg[f]
        if f == "vision_encoder_ls":
            assert list(vcfg.vision_encoder_ls) == expected
        elif expected is None:
            assert getattr(vcfg, f) is None, f
        else:
            assert getattr(vcfg, f) == expected, f
    assert vcfg.to_dict() == {f: cfg[f] for f in VPT_FIELDS}
    assert (bundle.clip_projector is not None) == (name == "clip")
    assert bundle.detection_model is bundle.detection_projector is bundle.seg_model is bundle.seg_projector is None
    assert bundle.reencode_kinds == tuple(cfg["vision_encoder_ls"])

    embed = bundle.model.model.language_model.embed_tokens.weight
    head = bundle.model.lm_head.weight
    assert head.data_ptr() != embed.data_ptr()
    assert not torch.equal(head, embed)
    assert torch.equal(head, read_bin(folder)["lm_head.weight"])

    tok = bundle.tokenizer
    for key, token in (
        ("image_token_id", spec.IMAGE_PAD), ("vision_start_token_id", spec.VISION_START),
        ("vision_end_token_id", spec.VISION_END), ("eos_token_id", spec.IM_END),
    ):
        assert tok.convert_tokens_to_ids(token) == cfg[key], key
    for kind, prefix in CONFIG_PREFIX.items():
        start, action, _end, pad = spec.ACTION_TOKENS[kind]
        for key, token in (("action_start_id", start), ("action_id", action), ("image_token_id", pad)):
            cfg_id = cfg[f"{prefix}_{key}"]
            if kind in cfg["vision_encoder_ls"]:
                assert cfg_id is not None
            if cfg_id is not None:
                assert tok.convert_tokens_to_ids(token) == cfg_id, (kind, key)
    for kind in cfg["vision_encoder_ls"]:
        assert vcfg.ids(kind) == (
            bundle.vocab.actions[kind].start, bundle.vocab.actions[kind].action, bundle.vocab.actions[kind].pad
        )


# ----------------------------------------------------------------------------- round trip


@pytest.fixture(params=[f"tiny-{v}" for v in VARIANTS] + ["original-region", "original-clip"])
def loaded(request, tiny_ckpt, tiny_bundle):
    """(folder, bundle) of every tiny variant and of the published checkpoints."""
    source, name = request.param.split("-")
    if source == "tiny":
        return tiny_ckpt(name), tiny_bundle(name)
    return ORIGINAL / name, load_vpt_checkpoint(ORIGINAL / name)


def test_base_model_logits_match_an_independent_build(loaded):
    folder, bundle = loaded
    ref = hand_model(folder)
    for inputs in (text_inputs(bundle), image_inputs(bundle)):
        got, want = logits(bundle.model, inputs), logits(ref, inputs)
        assert max_diff(got, want) <= TOL
        assert want.std() > 0.1  # not a degenerate model
    # images matter: the same token ids with other pixels give other logits
    other = image_inputs(bundle, seed=5)
    same_ids = dict(image_inputs(bundle), pixel_values=other["pixel_values"])
    assert max_diff(logits(bundle.model, same_ids), logits(bundle.model, image_inputs(bundle))) > 1e-3


def test_branch_weights_equal_the_file(loaded):
    folder, bundle = loaded
    sd = read_bin(folder)
    kinds = read_config(folder)["vision_encoder_ls"]
    assert bundle.reencode_kinds == tuple(kinds)
    for kind in kinds:
        proj = getattr(bundle, PROJECTOR[kind])
        own = proj.state_dict()
        file = {k[len(PROJECTOR[kind]) + 1:]: v for k, v in sd.items() if k.startswith(PROJECTOR[kind] + ".")}
        assert own.keys() == file.keys()
        for k in own:
            assert torch.equal(own[k], file[k]), k


def _renamed_towards(sd: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """DINOv2 attention keys renamed to whichever naming the module uses."""
    own = set(module.state_dict())
    pairs = DINO_V5_NAMES if any("q_proj" in k for k in own) else tuple((b, a) for a, b in DINO_V5_NAMES)
    out = {}
    for k, v in sd.items():
        for a, b in pairs:
            k = k.replace(a, b)
        out[k] = v
    return out


def test_dino_encoder_matches_an_independent_build(tiny_ckpt, tiny_bundle):
    folder, bundle = tiny_ckpt("dino"), tiny_bundle("dino")
    cfg = read_config(folder)
    ref = Dinov2Model(Dinov2Config(**cfg["vpt_detection_config"])).eval()
    sd = {k[len("detection_model."):]: v for k, v in read_bin(folder).items() if k.startswith("detection_model.")}
    ref.load_state_dict(_renamed_towards(sd, ref), strict=True)
    pixels = bundle.processor.dino_inputs([random_image(1, (90, 120)), random_image(2, (64, 64))])
    with torch.no_grad():
        got = bundle.detection_model(pixel_values=pixels).last_hidden_state
        want = ref(pixel_values=pixels).last_hidden_state
    assert got.shape == (2, 1 + 16 * 16, cfg["vpt_detection_config"]["hidden_size"])
    assert max_diff(got, want) <= TOL
    assert bundle.detection_projector.feature_dim == cfg["vpt_detection_config"]["hidden_size"]


def test_sam_encoder_matches_an_independent_build(tiny_ckpt, tiny_bundle):
    folder, bundle = tiny_ckpt("sam"), tiny_bundle("sam")
    cfg = read_config(folder)
    ref = SamVisionEncoder(SamVisionConfig(**cfg["vpt_seg_config"])).eval()
    sd = {k[len("seg_model."):]: v for k, v in read_bin(folder).items() if k.startswith("seg_model.")}
    ref.load_state_dict(sd, strict=True)
    pixels = bundle.processor.sam_inputs([random_image(3, (80, 50))])
    with torch.no_grad():
        got = bundle.seg_model(pixel_values=pixels).last_hidden_state
        want = ref(pixel_values=pixels).last_hidden_state
    assert got.shape == (1, cfg["vpt_seg_config"]["output_channels"], 64, 64)
    assert max_diff(got, want) <= TOL
    assert bundle.seg_projector.feature_dim == cfg["vpt_seg_config"]["output_channels"]


def test_tied_lm_head(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "tied", "region", tie_word_embeddings=True)
    assert read_config(folder)["tie_word_embeddings"] is True
    assert "lm_head.weight" not in read_bin(folder)
    bundle = load_vpt_checkpoint(folder)
    embed = bundle.model.model.language_model.embed_tokens.weight
    assert bundle.model.lm_head.weight.data_ptr() == embed.data_ptr()
    assert torch.equal(embed, read_bin(folder)["model.embed_tokens.weight"])
    ref = hand_model(folder)
    for inputs in (text_inputs(bundle), image_inputs(bundle)):
        assert max_diff(logits(bundle.model, inputs), logits(ref, inputs)) <= TOL
    # the tie survives a dtype conversion at load time
    half = load_vpt_checkpoint(folder, dtype=torch.bfloat16)
    embed = half.model.model.language_model.embed_tokens.weight
    assert embed.dtype == torch.bfloat16
    assert half.model.lm_head.weight.data_ptr() == embed.data_ptr()


# ----------------------------------------------------------------------------- other formats


def _save_safetensors(src: Path, dst: Path) -> Path:
    copy_without_weights(src, dst)
    save_file({k: v.contiguous() for k, v in read_bin(src).items()}, str(dst / "model.safetensors"))
    return dst


def _save_sharded(src: Path, dst: Path, shards: int = 3, safetensors: bool = False) -> Path:
    """`pytorch_model-0000i-of-0000n.bin` + `pytorch_model.bin.index.json` (or the safetensors pair)."""
    copy_without_weights(src, dst)
    sd = read_bin(src)
    keys = sorted(sd)
    weight_map = {}
    for i in range(shards):
        part = {k: sd[k].contiguous() for k in keys[i::shards]}
        if safetensors:
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, str(dst / name))
        else:
            name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
            torch.save(part, dst / name)
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index = "model.safetensors.index.json" if safetensors else "pytorch_model.bin.index.json"
    (dst / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return dst


def _save_transformers5(src: Path, dst: Path, bundle) -> Path:
    """Nested transformers 5 config plus the VPT fields; transformers 5 key names, safetensors."""
    copy_without_weights(src, dst)
    old = read_config(src)
    cfg = bundle.model.config.to_dict()
    cfg.update(bundle.vpt_config.to_dict())
    cfg["model_type"] = "qwen2_vl_vpt"
    cfg["architectures"] = ["VPT_Qwen2VLForConditionalGeneration"]
    for key in ("vpt_detection_config", "vpt_seg_config"):
        if key in old:
            cfg[key] = old[key]
    assert "text_config" in cfg and "hidden_size" not in cfg
    write_config(dst, cfg)
    sd = {}
    for k, v in read_bin(src).items():
        k = to_v5_key(k)
        if k.startswith("detection_model."):
            for a, b in DINO_V5_NAMES:
                k = k.replace(a, b)
        sd[k] = v.contiguous()
    assert any(k.startswith("model.language_model.layers.") for k in sd)
    assert any(k.startswith("model.visual.") for k in sd)
    save_file(sd, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("fmt", ["safetensors", "sharded-bin", "sharded-safetensors", "transformers5"])
@pytest.mark.parametrize("variant", ["clip", "dino", "sam"])
def test_other_formats_load_the_same(tmp_path, tiny_ckpt, tiny_bundle, variant, fmt):
    src, base = tiny_ckpt(variant), tiny_bundle(variant)
    dst = tmp_path / fmt
    if fmt == "safetensors":
        _save_safetensors(src, dst)
    elif fmt == "sharded-bin":
        _save_sharded(src, dst)
    elif fmt == "sharded-safetensors":
        _save_sharded(src, dst, safetensors=True)
    else:
        _save_transformers5(src, dst, base)
    bundle = load_vpt_checkpoint(dst)
    assert bundle.vpt_config == base.vpt_config
    assert bundle.reencode_kinds == (variant,)
    for name in ("model", "clip_projector", "detection_model", "detection_projector", "seg_model", "seg_projector"):
        a, b = getattr(bundle, name), getattr(base, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert_same_modules(a, b)
    for inputs in (text_inputs(bundle), image_inputs(bundle)):
        assert max_diff(logits(bundle.model, inputs), logits(base.model, inputs)) <= 1e-6


def test_plain_qwen2vl_checkpoint(tmp_path, tiny_ckpt, tiny_bundle):
    src = tiny_ckpt("clip")
    dst = copy_without_weights(src, tmp_path / "plain")
    cfg = read_config(src)
    for key in VPT_FIELDS + ("vpt_detection_config", "vpt_seg_config"):
        cfg.pop(key, None)
    cfg["model_type"] = "qwen2_vl"
    cfg["architectures"] = ["Qwen2VLForConditionalGeneration"]
    write_config(dst, cfg)
    write_bin(dst, {k: v for k, v in read_bin(src).items() if not k.startswith(BRANCH_PREFIXES)})
    bundle = load_vpt_checkpoint(dst)
    assert bundle.vpt_config.is_vpt is False
    assert bundle.vpt_config.vision_encoder_ls == ()
    assert bundle.vpt_config.num_inner_forward_run == 1
    assert bundle.reencode_kinds == ()
    assert bundle.clip_projector is bundle.detection_model is bundle.seg_model is None
    base = tiny_bundle("clip")
    for inputs in (text_inputs(bundle), image_inputs(bundle)):
        assert max_diff(logits(bundle.model, inputs), logits(base.model, inputs)) <= 1e-6


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def clip_copy(tmp_path, tiny_ckpt):
    """A private copy of the tiny clip checkpoint, free to alter."""
    return copy_checkpoint(tiny_ckpt("clip"), tmp_path / "ckpt")


def edit_config(folder: Path, **changes) -> None:
    cfg = read_config(folder)
    cfg.update(changes)
    write_config(folder, cfg)


def edit_weights(folder: Path, fn) -> None:
    sd = read_bin(folder)
    fn(sd)
    write_bin(folder, sd)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder .*nowhere does not exist"):
        load_vpt_checkpoint(tmp_path / "nowhere")


def test_file_instead_of_folder(clip_copy):
    with pytest.raises(CheckpointError, match="config.json is not a folder"):
        load_vpt_checkpoint(clip_copy / "config.json")


def test_folder_without_config(clip_copy):
    (clip_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_vpt_checkpoint(clip_copy)


def test_invalid_json(clip_copy):
    (clip_copy / "config.json").write_text('{"model_type": "qwen2_vl_vpt",')
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_vpt_checkpoint(clip_copy)


def test_other_model_type(clip_copy):
    edit_config(clip_copy, model_type="llama")
    with pytest.raises(CheckpointError, match="model_type 'llama' is not a VPT or Qwen2-VL model"):
        load_vpt_checkpoint(clip_copy)


def test_no_weight_files(clip_copy):
    (clip_copy / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="no weights in .*expected model.safetensors, pytorch_model.bin"):
        load_vpt_checkpoint(clip_copy)


def test_branch_named_without_its_weights(clip_copy):
    edit_weights(clip_copy, lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("clip_projector.")])
    with pytest.raises(CheckpointError, match=r"vision_encoder_ls names 'clip' but the checkpoint has no clip_projector\.\* weights"):
        load_vpt_checkpoint(clip_copy)


def test_branch_weights_without_the_branch(clip_copy):
    edit_config(clip_copy, vision_encoder_ls=[], num_inner_forward_run=1)
    with pytest.raises(CheckpointError, match=r"weights hold clip_projector\.\* but vision_encoder_ls \[\] does not name 'clip'"):
        load_vpt_checkpoint(clip_copy)


def test_sam_named_without_encoder_weights(tmp_path, tiny_ckpt):
    folder = copy_checkpoint(tiny_ckpt("sam"), tmp_path / "sam")
    edit_weights(folder, lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("seg_model.")])
    with pytest.raises(CheckpointError, match=r"vision_encoder_ls names 'sam' but the checkpoint has no seg_model\.\* weights"):
        load_vpt_checkpoint(folder)


def test_unexpected_weight_is_listed(clip_copy):
    edit_weights(clip_copy, lambda sd: sd.update({"model.layers.0.mlp.extra_proj.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"Qwen2-VL: weights do not match.*missing 0 \[\]; unexpected 1 \[.*layers\.0\.mlp\.extra_proj\.weight'\]"):
        load_vpt_checkpoint(clip_copy)


def test_unexpected_projector_weight_is_listed(clip_copy):
    edit_weights(clip_copy, lambda sd: sd.update({"clip_projector.gate.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"clip_projector: weights do not match.*unexpected 1 \['gate\.weight'\]"):
        load_vpt_checkpoint(clip_copy)


def test_missing_weight_is_listed(clip_copy):
    edit_weights(clip_copy, lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 \[.*layers\.1\.mlp\.down_proj\.weight'\]; unexpected 0"):
        load_vpt_checkpoint(clip_copy)


def test_missing_lm_head_when_untied(clip_copy):
    edit_weights(clip_copy, lambda sd: sd.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 \['lm_head\.weight'\]"):
        load_vpt_checkpoint(clip_copy)


def test_index_naming_a_missing_shard(tmp_path, tiny_ckpt):
    folder = _save_sharded(tiny_ckpt("clip"), tmp_path / "sharded")
    (folder / "pytorch_model-00002-of-00003.bin").unlink()
    with pytest.raises(CheckpointError, match=r"names shards that are not in .*\['pytorch_model-00002-of-00003\.bin'\]"):
        load_vpt_checkpoint(folder)


def test_shape_mismatch(clip_copy):
    edit_weights(clip_copy, lambda sd: sd.update({"model.norm.weight": torch.ones(63)}))
    with pytest.raises(CheckpointError, match=r"weight shapes differ: .*norm\.weight: checkpoint \(63,\) vs model \(64,\)"):
        load_vpt_checkpoint(clip_copy)


def test_unknown_encoder(clip_copy):
    edit_config(clip_copy, vision_encoder_ls=["clip", "owl"])
    with pytest.raises(CheckpointError, match=r"vision_encoder_ls holds unknown encoders \['owl'\]"):
        load_vpt_checkpoint(clip_copy)


def test_num_inner_forward_run_3(clip_copy):
    edit_config(clip_copy, num_inner_forward_run=3)
    with pytest.raises(CheckpointError, match="num_inner_forward_run must be 1 or 2, got 3"):
        load_vpt_checkpoint(clip_copy)


def test_projector_scale_2(clip_copy):
    edit_config(clip_copy, projector_scale=2)
    with pytest.raises(CheckpointError, match="projector_scale must be 1 .* got 2"):
        load_vpt_checkpoint(clip_copy)


def test_config_not_an_object(clip_copy):
    (clip_copy / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="must hold a JSON object, got list"):
        load_vpt_checkpoint(clip_copy)


def test_config_ids_disagree_with_tokenizer(clip_copy):
    cfg = read_config(clip_copy)
    edit_config(clip_copy, clip_action_id=cfg["clip_action_id"] + 1)
    with pytest.raises(CheckpointError, match=re.escape("config.json and the tokenizer disagree: clip: config (start, action, pad)")):
        load_vpt_checkpoint(clip_copy)


def test_image_token_id_disagrees_with_tokenizer(clip_copy):
    cfg = read_config(clip_copy)
    edit_config(clip_copy, image_token_id=cfg["image_token_id"] + 1)
    with pytest.raises(CheckpointError, match="config.json and the tokenizer disagree: image_token_id"):
        load_vpt_checkpoint(clip_copy)


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


# ----------------------------------------------------------------------------- unreadable files, options


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _to_safetensors(folder: Path) -> Path:
    save_file({k: v.contiguous() for k, v in read_bin(folder).items()}, str(folder / "model.safetensors"))
    (folder / "pytorch_model.bin").unlink()
    return folder / "model.safetensors"


@pytest.mark.parametrize("damage,message", [
    (lambda f: (f / "pytorch_model.bin").write_bytes(b""), r"pytorch_model\.bin is empty \(0 bytes\)"),
    (lambda f: (f / "pytorch_model.bin").write_bytes(np.random.RandomState(0).bytes(5000)),
     r"pytorch_model\.bin cannot be read as a torch-saved weight file"),
    (lambda f: _truncate(f / "pytorch_model.bin"), r"pytorch_model\.bin cannot be read as a torch-saved weight file"),
    (lambda f: torch.save([1, 2], f / "pytorch_model.bin"), r"pytorch_model\.bin holds a list, not a dict of named tensors"),
    (lambda f: _truncate(_to_safetensors(f)), r"model\.safetensors cannot be read as a safetensors weight file"),
    (lambda f: _to_safetensors(f).write_bytes(np.random.RandomState(1).bytes(3000)),
     r"model\.safetensors cannot be read as a safetensors weight file"),
    (lambda f: (f / "pytorch_model.bin.index.json").write_text("{not json"), r"pytorch_model\.bin\.index\.json is not valid JSON"),
    (lambda f: (f / "pytorch_model.bin.index.json").write_text('{"metadata": {}}'),
     r"pytorch_model\.bin\.index\.json must hold a non-empty \"weight_map\""),
    (lambda f: (f / "model.safetensors.index.json").write_text('{"weight_map": ["a"]}'), r"must hold a non-empty \"weight_map\""),
    (lambda f: (f / "preprocessor_config.json").write_text("{oops"), r"preprocessor_config\.json is not valid JSON"),
    (lambda f: (f / "preprocessor_config.json").write_text('{"patch_size": 0}'),
     r"preprocessor_config\.json: patch_size must be a positive int, got 0"),
    (lambda f: (f / "preprocessor_config.json").write_text('{"image_std": [0.2, 0, 0.2]}'), "image_std must be positive"),
    (lambda f: (f / "preprocessor_config.json").write_text('{"min_pixels": 100, "max_pixels": 50}'),
     "min_pixels 100 is above max_pixels 50"),
    (lambda f: (f / "preprocessor_config.json").write_text("[1]"), r"preprocessor_config\.json must hold a JSON object"),
    (lambda f: edit_config(f, hidden_size="wide"), r"config\.json is not a valid Qwen2-VL config"),
], ids=["empty-bin", "random-bin", "truncated-bin", "bin-of-a-list", "truncated-safetensors", "random-safetensors",
        "index-not-json", "index-without-weight-map", "weight-map-not-an-object", "processor-not-json",
        "processor-zero-patch", "processor-zero-std", "processor-pixels", "processor-not-an-object", "config-bad-value"])
def test_unreadable_files_name_themselves(clip_copy, damage, message):
    damage(clip_copy)
    with pytest.raises(CheckpointError, match=message) as caught:
        load_vpt_checkpoint(clip_copy)
    assert str(clip_copy) in str(caught.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(clip_copy, value):
    def poison(sd):
        sd["model.layers.1.mlp.up_proj.weight"][3, 5] = value
        sd["clip_projector.linear_condition.weight"][:] = value

    edit_weights(clip_copy, poison)
    with pytest.raises(CheckpointError, match=r"2 weight tensor\(s\) hold NaN or inf values: "
                                              r"\['model\.language_model\.layers\.1\.mlp\.up_proj\.weight', "
                                              r"'clip_projector\.linear_condition\.weight'\]"):
        load_vpt_checkpoint(clip_copy)


def test_a_float16_overflow_is_refused(clip_copy):
    edit_weights(clip_copy, lambda sd: sd["model.norm.weight"].fill_(1e6))
    load_vpt_checkpoint(clip_copy)  # finite in float32
    with pytest.raises(CheckpointError, match=r"\['model\.language_model\.norm\.weight'\]"):
        load_vpt_checkpoint(clip_copy, dtype="float16")


def test_dtype_and_device_options(tiny_ckpt, tiny_bundle):
    folder = tiny_ckpt("region")
    bf16 = load_vpt_checkpoint(folder, dtype="bfloat16")
    assert bf16.model.lm_head.weight.dtype == torch.bfloat16
    assert load_vpt_checkpoint(folder, dtype="torch.float16").model.lm_head.weight.dtype == torch.float16
    want = tiny_bundle("region").model.lm_head.weight.to(torch.bfloat16)
    assert torch.equal(bf16.model.lm_head.weight, want)
    for dtype, message in ((torch.float64, "dtype torch.float64 is not supported"), ("int8", "dtype 'int8' is not supported"),
                           (torch.int32, "not supported")):
        with pytest.raises(ValueError, match=message):
            load_vpt_checkpoint(folder, dtype=dtype)
    with pytest.raises(ValueError, match="device 'meta' is not supported: vpt_fast runs on 'cpu' and 'cuda'"):
        load_vpt_checkpoint(folder, device="meta")
    with pytest.raises(ValueError, match="device 'gpu0' is not a torch device"):
        load_vpt_checkpoint(folder, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' is not available here"):
            load_vpt_checkpoint(folder, device="cuda")


def test_engine_refuses_what_it_cannot_run(tiny_bundle):
    import vpt_fast
    from vpt_fast.engine import Engine

    b = tiny_bundle("region")
    with pytest.raises(ValueError, match="max_seq_len 10000000 is above the model's max_position_embeddings 32768"):
        Engine(b, max_seq_len=10**7)
    with pytest.raises(ValueError, match="max_seq_len 40000 is above"):
        vpt_fast.accelerate(b.model, b.tokenizer, max_seq_len=40000)
    meta = Qwen2VLForConditionalGeneration._from_config(b.model.config)
    meta.to("meta")
    with pytest.raises(ValueError, match="the model cannot run here: device 'meta' is not supported"):
        vpt_fast.accelerate(meta, b.tokenizer)
    wide = Qwen2VLForConditionalGeneration._from_config(b.model.config).to(torch.float64)
    with pytest.raises(ValueError, match="the model cannot run here: dtype torch.float64 is not supported"):
        vpt_fast.accelerate(wide, b.tokenizer)


def test_loading_prints_no_transformers_warnings(tiny_ckpt, capfd):
    import logging

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logging.get_logger().addHandler(handler)
    try:
        for folder in (tiny_ckpt("clip"), ORIGINAL / "region"):
            load_vpt_checkpoint(folder)
    finally:
        hf_logging.get_logger().removeHandler(handler)
        hf_logging.set_verbosity(verbosity)
    assert [r.getMessage() for r in records] == []
    assert "[transformers]" not in capfd.readouterr().err


# ----------------------------------------------------------------------------- dtypes as transformers keeps them


def _dtypes(module: torch.nn.Module) -> dict[str, torch.dtype]:
    return {**{n: p.dtype for n, p in module.named_parameters()}, **{n: b.dtype for n, b in module.named_buffers()}}


def _transformers_copy(bundle, src: Path, dst: Path) -> Path:
    """The bundle's Qwen2-VL weights saved by transformers itself, for its own from_pretrained."""
    bundle.model.save_pretrained(dst)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "preprocessor")):
            shutil.copy(f, dst / f.name)
    return dst


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["released", "safetensors", "transformers5"])
def test_every_load_path_keeps_float32_what_transformers_keeps(tmp_path, tiny_ckpt, tiny_bundle, fmt, dtype):
    """Parameters and buffers get the dtypes transformers' own from_pretrained gives the same
    weights: the rotary inverse frequencies (text and vision) stay float32 and equal, and the
    logits of the two loads agree bit for bit."""
    src, base = tiny_ckpt("sam"), tiny_bundle("sam")
    folder = {"released": lambda: src, "safetensors": lambda: _save_safetensors(src, tmp_path / fmt),
              "transformers5": lambda: _save_transformers5(src, tmp_path / fmt, base)}[fmt]()
    ours = load_vpt_checkpoint(folder, dtype=dtype)
    theirs = Qwen2VLForConditionalGeneration.from_pretrained(_transformers_copy(base, src, tmp_path / "hf"), dtype=dtype)
    assert _dtypes(ours.model) == _dtypes(theirs)
    inv_freq = [n for n in _dtypes(theirs) if n.endswith("inv_freq")]
    assert len(inv_freq) == 4  # text and vision, each with its original_inv_freq
    for name in inv_freq:
        assert ours.model.get_buffer(name).dtype == torch.float32, name
        assert torch.equal(ours.model.get_buffer(name), theirs.get_buffer(name)), name
    inputs = image_inputs(ours)
    assert torch.equal(logits(ours.model, inputs), logits(theirs.eval(), inputs))
    for name in ("seg_model", "seg_projector"):
        assert {d for d in _dtypes(getattr(ours, name)).values()} == {dtype}, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_accelerate_leaves_a_transformers_model_as_transformers_loaded_it(tmp_path, tiny_ckpt, tiny_bundle, dtype):
    import vpt_fast

    src = tiny_ckpt("region")
    model = Qwen2VLForConditionalGeneration.from_pretrained(_transformers_copy(tiny_bundle("region"), src, tmp_path / "hf"),
                                                            dtype=dtype)
    before = _dtypes(model)
    assert before["model.language_model.rotary_emb.inv_freq"] == torch.float32
    engine = vpt_fast.accelerate(model, tiny_bundle("region").tokenizer, patch=False, max_seq_len=256)
    assert _dtypes(model) == before
    assert engine.runner.rotary.inv_freq.dtype == torch.float32


class _KeepsNorm(torch.nn.Module):
    """A module declaring what transformers keeps in float32: `norm` always, `head` under float16."""

    _keep_in_fp32_modules_strict = ["norm"]
    _keep_in_fp32_modules = ["head"]

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.head = torch.nn.Linear(4, 2)
        self.tied = self.body.weight
        self.register_buffer("scale", torch.ones(4))
        self.register_buffer("freq", torch.arange(4.0), persistent=False)


@pytest.mark.parametrize("dtype,float32_parts", [(torch.bfloat16, ("norm",)), (torch.float16, ("norm", "head"))])
def test_cast_follows_keep_in_fp32_declarations(dtype, float32_parts):
    from vpt_fast._hf_compat import cast_like_from_pretrained

    m = cast_like_from_pretrained(_KeepsNorm(), dtype, "cpu")
    for name, p in m.named_parameters():
        want = torch.float32 if name.split(".")[0] in float32_parts else dtype
        assert p.dtype == want, name
    assert m.tied is m.body.weight and m.body.weight.dtype == dtype
    assert m.scale.dtype == dtype and m.freq.dtype == torch.float32
