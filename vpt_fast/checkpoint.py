"""Loading VPT checkpoints (docs/vpt.md §3) into transformers 5 modules.

Released checkpoints were written by transformers 4.45: a flat Qwen2-VL config with
`model_type: "qwen2_vl_vpt"` plus the VPT fields, and weights with 4.45 key names
(`model.layers.*`, `visual.*`, ...), saved as `pytorch_model*.bin`. This module
reads that format (and safetensors, sharded or not, and the transformers 5 layout),
renames keys to the transformers 5 modules, and refuses missing or unexpected
weights with the list of them. The DINOv2 and SAM encoders the released models use
(facebook/dinov2-large, facebook/sam-vit-large) are known here by their published
architecture, so nothing is downloaded; a config.json may instead carry
`vpt_detection_config` / `vpt_seg_config` (a transformers config dict), which the
small test checkpoints do.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import _hf_compat, spec
from .preprocess import QwenImageConfig, VPTImageProcessor
from .projectors import ClipProjector, DetectionProjector, SegProjector

VPT_MODEL_TYPE = "qwen2_vl_vpt"
QWEN2VL_MODEL_TYPE = "qwen2_vl"

# facebook/dinov2-large, as published (the released VPT-Det models load it from the hub).
DINOV2_LARGE = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, image_size=518,
    patch_size=14, num_channels=3, qkv_bias=True, layerscale_value=1.0, hidden_act="gelu",
    layer_norm_eps=1e-6, use_swiglu_ffn=False, drop_path_rate=0.0,
)
# facebook/sam-vit-large vision encoder, as published.
SAM_VIT_LARGE = dict(
    hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, output_channels=256, image_size=1024,
    patch_size=16, num_channels=3, mlp_dim=4096, window_size=14, global_attn_indexes=[5, 11, 17, 23],
    qkv_bias=True, use_abs_pos=True, use_rel_pos=True, layer_norm_eps=1e-6, hidden_act="gelu",
)


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as it is."""


SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A supported torch dtype from a dtype or its name ("bfloat16", "bf16", "torch.float16", ...)."""
    if isinstance(dtype, str):
        found = _DTYPE_NAMES.get(dtype.lower().removeprefix("torch."))
        if found is None:
            raise ValueError(f"dtype {dtype!r} is not supported: use 'float32', 'bfloat16' or 'float16'")
        return found
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported: use torch.float32, torch.bfloat16 or torch.float16")
    return dtype


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device this machine has, of a supported type (cpu, cuda)."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"device {device!r} is not a torch device ({e})") from None
    if d.type == "cpu":
        return d
    if d.type != "cuda":
        raise ValueError(f"device {str(d)!r} is not supported: vpt_fast runs on 'cpu' and 'cuda' devices")
    if not torch.cuda.is_available():
        why = "torch was built without CUDA" if torch.version.cuda is None else "torch sees no CUDA device"
        raise ValueError(f"device {str(d)!r} is not available here: {why}")
    if d.index is not None and d.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(d)!r} is not available here: {torch.cuda.device_count()} CUDA device(s)")
    return d


def placement(device: str | torch.device | None = None, dtype: str | None = None) -> tuple[torch.device, str]:
    """(device, dtype name) to load a model with: the device given (checked by
    `resolve_device`), else cuda when this process sees a GPU (in a Ray actor: the ones Ray
    gave it), else the CPU; the dtype given, else bfloat16 on a GPU and float32 on the CPU."""
    d = resolve_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return d, dtype or ("bfloat16" if d.type == "cuda" else "float32")


@dataclass(frozen=True)
class VPTConfig:
    """The VPT fields of a checkpoint's config.json (docs/vpt.md §3)."""

    detection_image_token_id: int | None = None
    detection_action_id: int | None = None
    detection_action_start_id: int | None = None
    clip_image_token_id: int | None = None
    clip_action_id: int | None = None
    clip_action_start_id: int | None = None
    seg_image_token_id: int | None = None
    seg_action_id: int | None = None
    seg_action_start_id: int | None = None
    para_start_id: int | None = None
    para_end_id: int | None = None
    num_inner_forward_run: int = 1
    projector_scale: int = 1
    para_mask_id: int = 0
    para_mask_ratio: float = 0.0
    alignment: bool = False
    vision_encoder_ls: tuple[str, ...] = ()
    is_vpt: bool = False

    _PREFIX = {"dino": "detection", "clip": "clip", "sam": "seg"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VPTConfig":
        names = [f for f in cls.__dataclass_fields__ if f not in ("is_vpt", "vision_encoder_ls")]
        values = {f: d[f] for f in names if f in d and d[f] is not None}
        encoders = tuple(d.get("vision_encoder_ls") or ())
        unknown = [e for e in encoders if e not in spec.REENCODE_KINDS]
        if unknown:
            raise CheckpointError(f"vision_encoder_ls holds unknown encoders {unknown}; known: {list(spec.REENCODE_KINDS)}")
        if values.get("num_inner_forward_run", 1) not in (1, 2):
            raise CheckpointError(f"num_inner_forward_run must be 1 or 2, got {values['num_inner_forward_run']}")
        if values.get("projector_scale", 1) != 1:
            raise CheckpointError(
                f"projector_scale must be 1 (every released VPT checkpoint uses 1), got {values['projector_scale']}"
            )
        return cls(**values, vision_encoder_ls=encoders, is_vpt=d.get("model_type") == VPT_MODEL_TYPE)

    def to_dict(self) -> dict[str, Any]:
        out = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "is_vpt"}
        out["vision_encoder_ls"] = list(self.vision_encoder_ls)
        return out

    def ids(self, kind: str) -> tuple[int | None, int | None, int | None]:
        """(action_start, action, image_pad) ids of a re-encoding kind, from the config."""
        p = self._PREFIX[kind]
        return (getattr(self, f"{p}_action_start_id"), getattr(self, f"{p}_action_id"), getattr(self, f"{p}_image_token_id"))

    @property
    def two_pass(self) -> bool:
        return self.num_inner_forward_run == 2

    @property
    def start_to_action(self) -> dict[int, int]:
        """`<|X_action_start|>` id -> `<|X_action|>` id, for every kind whose ids the config names."""
        out = {}
        for kind in spec.REENCODE_KINDS:
            start, action, _pad = self.ids(kind)
            if action is not None:
                out[start] = action
        return out


@dataclass
class VPTBundle:
    """Everything a VPT checkpoint holds, as transformers 5 / torch modules."""

    model: nn.Module  # transformers Qwen2VLForConditionalGeneration
    tokenizer: Any
    processor: VPTImageProcessor
    vpt_config: VPTConfig
    vocab: spec.Vocab
    clip_projector: ClipProjector | None = None
    detection_model: nn.Module | None = None
    detection_projector: DetectionProjector | None = None
    seg_model: nn.Module | None = None
    seg_projector: SegProjector | None = None
    path: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def reencode_kinds(self) -> tuple[str, ...]:
        """Re-encoding kinds this checkpoint can serve (its branch exists)."""
        have = {"clip": self.clip_projector, "dino": self.detection_projector, "sam": self.seg_projector}
        return tuple(k for k in spec.REENCODE_KINDS if have[k] is not None)


# ----------------------------------------------------------------------------- configs


def _qwen2vl_config(d: dict[str, Any]):
    """A transformers 5 Qwen2VLConfig from a 4.45 flat or a 5.x nested config dict."""
    from transformers import Qwen2VLConfig

    d = dict(d)
    for k in ("model_type", "architectures", "transformers_version", "auto_map", "vpt_detection_config", "vpt_seg_config"):
        d.pop(k, None)
    for k in VPTConfig.__dataclass_fields__:
        d.pop(k, None)
    vision = dict(d.get("vision_config") or {})
    if "in_chans" in vision:  # 4.45 name
        vision["in_channels"] = vision.pop("in_chans")
    vision.pop("model_type", None)
    d["vision_config"] = vision
    if "torch_dtype" in d:
        d["dtype"] = d.pop("torch_dtype")
    # transformers 4.45 wrote rope_scaling {type: mrope|default, mrope_section}; 5.x maps it itself.
    return Qwen2VLConfig(**d)


def _dinov2_config(d: dict[str, Any] | None):
    from transformers import Dinov2Config

    return Dinov2Config(**(d if d is not None else DINOV2_LARGE))


def _sam_config(d: dict[str, Any] | None):
    from transformers import SamVisionConfig

    return SamVisionConfig(**(d if d is not None else SAM_VIT_LARGE))


# ----------------------------------------------------------------------------- weights


def _read_json(f: Path) -> Any:
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f} is not valid JSON: {e}") from e
    except OSError as e:
        raise CheckpointError(f"{f} cannot be read: {e}") from e


def _find_weight_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            weight_map = _read_json(index)
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index} must hold a non-empty \"weight_map\" object mapping tensor names to shard files")
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{index} names shards that are not in {folder}: {missing}")
            return [folder / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).exists():
            return [folder / name]
    raise CheckpointError(
        f"no weights in {folder}: expected model.safetensors, pytorch_model.bin or a sharded index of either"
    )


def _read_weight_file(f: Path) -> dict[str, torch.Tensor]:
    """The tensors of one weight file; CheckpointError naming the file when it cannot be read."""
    if f.stat().st_size == 0:
        raise CheckpointError(f"{f} is empty (0 bytes)")
    try:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(f), device="cpu")
        else:
            tensors = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
    except MemoryError:
        raise
    except Exception as e:  # truncated, corrupt or foreign data: whatever the reader raises
        kind = "safetensors" if f.suffix == ".safetensors" else "torch-saved"
        raise CheckpointError(f"{f} cannot be read as a {kind} weight file ({type(e).__name__}: {e})") from e
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
        raise CheckpointError(f"{f} holds a {type(tensors).__name__}, not a dict of named tensors")
    return tensors


def read_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, by their stored names."""
    out: dict[str, torch.Tensor] = {}
    for f in _find_weight_files(Path(folder)):
        out.update(_read_weight_file(f))
    return out


def _rename_base_key(key: str) -> str:
    """4.45 Qwen2-VL key -> transformers 5 key (5.x keys pass through)."""
    if key.startswith("model.language_model.") or key.startswith("model.visual."):
        return key
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    if key.startswith("visual."):
        return "model." + key
    return key


def _load_into(module: nn.Module, sd: dict[str, torch.Tensor], what: str, tied: tuple[str, ...] = ()) -> None:
    own = module.state_dict()
    missing = sorted(k for k in own if k not in sd and k not in tied)
    unexpected = sorted(k for k in sd if k not in own)
    if missing or unexpected:
        raise CheckpointError(
            f"{what}: weights do not match the model: "
            f"missing {len(missing)} {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
            f"unexpected {len(unexpected)} {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}"
        )
    shape_errors = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in sd if sd[k].shape != own[k].shape]
    if shape_errors:
        raise CheckpointError(f"{what}: weight shapes differ: {shape_errors[:10]}")
    module.load_state_dict(sd, strict=False, assign=False)


def _build(factory):
    """Construct modules without spending time on random init (weights are loaded next)."""
    with _hf_compat.no_init_weights():
        return factory()


# ----------------------------------------------------------------------------- tokenizer / processor


def load_tokenizer(folder: str | os.PathLike, config=None):
    """The checkpoint's tokenizer. config: its transformers config, when already built (so
    transformers does not read a VPT config.json as one of its own and warn about it)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, config=config)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load a tokenizer from {folder}: {e}") from e


def load_processor(folder: str | os.PathLike, vision_config=None) -> VPTImageProcessor:
    """The image processor of preprocessor_config.json; without that file, the settings the
    model's vision config implies (`QwenImageConfig.from_vision_config`), else the defaults."""
    f = Path(folder) / "preprocessor_config.json"
    if not f.exists():
        if vision_config is not None:
            return VPTImageProcessor(qwen=QwenImageConfig.from_vision_config(vision_config))
        return VPTImageProcessor(qwen=QwenImageConfig())
    d = _read_json(f)
    if not isinstance(d, dict):
        raise CheckpointError(f"{f} must hold a JSON object, got {type(d).__name__}")
    try:
        return VPTImageProcessor(qwen=QwenImageConfig.from_dict(d))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{f}: {e}") from e


def _check_token_ids(vcfg: VPTConfig, vocab: spec.Vocab, qcfg) -> None:
    """The ids in config.json must be the tokenizer's ids for the same tokens."""
    problems = []
    for name, cfg_id, tok_id in (
        ("image_token_id", qcfg.image_token_id, vocab.image_pad),
        ("vision_start_token_id", qcfg.vision_start_token_id, vocab.vision_start),
        ("vision_end_token_id", qcfg.vision_end_token_id, vocab.vision_end),
    ):
        if cfg_id != tok_id:
            problems.append(f"{name}: config {cfg_id}, tokenizer {tok_id}")
    for kind in vcfg.vision_encoder_ls:
        start, action, pad = vcfg.ids(kind)
        ids = vocab.actions.get(kind)
        if ids is None:
            problems.append(f"{kind}: the tokenizer lacks its action tokens")
        elif (start, action, pad) != (ids.start, ids.action, ids.pad):
            problems.append(f"{kind}: config (start, action, pad) {(start, action, pad)}, tokenizer {(ids.start, ids.action, ids.pad)}")
    if problems:
        raise CheckpointError("config.json and the tokenizer disagree: " + "; ".join(problems))


# ----------------------------------------------------------------------------- entry point


def load_vpt_checkpoint(path: str | os.PathLike, dtype: torch.dtype | str = torch.float32,
                        device: str | torch.device = "cpu") -> VPTBundle:
    """Load a VPT (or plain Qwen2-VL) checkpoint folder into a `VPTBundle`.

    Reads config.json (4.45 flat or 5.x nested layout), the weights (.bin, sharded
    .bin, safetensors), the tokenizer and preprocessor_config.json. dtype: float32,
    bfloat16 or float16 (a torch dtype or its name); device: "cpu" or a CUDA device
    present here (ValueError otherwise, before anything is read). Raises
    `CheckpointError` naming the file and what is wrong: a missing folder or file,
    unreadable JSON or weights, another model type, missing or unexpected weights
    (listed), a VPT branch without its weights, weights holding NaN or inf.
    """
    from transformers import Qwen2VLForConditionalGeneration

    dtype, device = resolve_dtype(dtype), resolve_device(device)
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint path {folder} is not a folder")
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{folder} has no config.json")
    cfg = _read_json(cfg_file)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_file} must hold a JSON object, got {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    if model_type not in (VPT_MODEL_TYPE, QWEN2VL_MODEL_TYPE):
        raise CheckpointError(
            f"{cfg_file}: model_type {model_type!r} is not a VPT or Qwen2-VL model "
            f"(expected {VPT_MODEL_TYPE!r} or {QWEN2VL_MODEL_TYPE!r})"
        )
    vcfg = VPTConfig.from_dict(cfg)
    try:
        qcfg = _qwen2vl_config(cfg)
    except Exception as e:  # transformers' validators raise their own error types too
        raise CheckpointError(f"{cfg_file} is not a valid Qwen2-VL config: {e}") from e
    qcfg._attn_implementation = "sdpa"
    hidden = qcfg.text_config.hidden_size

    tokenizer = load_tokenizer(folder, qcfg)
    vocab = spec.Vocab.from_tokenizer(tokenizer)
    _check_token_ids(vcfg, vocab, qcfg)

    sd = read_state_dict(folder)
    groups: dict[str, dict[str, torch.Tensor]] = {
        "clip_projector": {}, "detection_model": {}, "detection_projector": {}, "seg_model": {}, "seg_projector": {}, "base": {},
    }
    for k, v in sd.items():
        head, _, rest = k.partition(".")
        if head in groups and head != "base":
            groups[head][rest] = v
        else:
            groups["base"][_rename_base_key(k)] = v
    del sd

    model = _build(lambda: Qwen2VLForConditionalGeneration(qcfg))
    tied = ("lm_head.weight",) if qcfg.tie_word_embeddings and "lm_head.weight" not in groups["base"] else ()
    _load_into(model, groups["base"], "Qwen2-VL", tied)
    if tied or qcfg.tie_word_embeddings:
        model.lm_head.weight = _hf_compat.text_model(model).embed_tokens.weight

    encoders = set(vcfg.vision_encoder_ls)
    for name, kind in (("clip_projector", "clip"), ("detection_projector", "dino"), ("seg_projector", "sam")):
        if groups[name] and kind not in encoders:
            raise CheckpointError(f"weights hold {name}.* but vision_encoder_ls {list(vcfg.vision_encoder_ls)} does not name {kind!r}")
        if kind in encoders and not groups[name]:
            raise CheckpointError(f"vision_encoder_ls names {kind!r} but the checkpoint has no {name}.* weights")
    for name in ("detection_model", "seg_model"):
        kind = "dino" if name == "detection_model" else "sam"
        if groups[name] and kind not in encoders:
            raise CheckpointError(f"weights hold {name}.* but vision_encoder_ls {list(vcfg.vision_encoder_ls)} does not name {kind!r}")
        if kind in encoders and not groups[name]:
            raise CheckpointError(f"vision_encoder_ls names {kind!r} but the checkpoint has no {name}.* weights")

    bundle = VPTBundle(model=model, tokenizer=tokenizer, processor=load_processor(folder, qcfg.vision_config),
                       vpt_config=vcfg, vocab=vocab, path=str(folder))
    if "clip" in encoders:
        bundle.clip_projector = _build(lambda: ClipProjector(hidden, vcfg.projector_scale))
        _load_into(bundle.clip_projector, groups["clip_projector"], "clip_projector")
    if "dino" in encoders:
        dcfg = _dinov2_config(cfg.get("vpt_detection_config"))
        bundle.detection_model = _build(lambda: _hf_compat.dinov2_model(dcfg))
        _load_into(bundle.detection_model, _hf_compat.match_dinov2_names(groups["detection_model"], bundle.detection_model),
                   "detection_model (DINOv2)")
        bundle.detection_projector = _build(lambda: DetectionProjector(dcfg.hidden_size, hidden, vcfg.projector_scale))
        _load_into(bundle.detection_projector, groups["detection_projector"], "detection_projector")
    if "sam" in encoders:
        scfg = _sam_config(cfg.get("vpt_seg_config"))
        bundle.seg_model = _build(lambda: _hf_compat.sam_vision_encoder(scfg))
        _load_into(bundle.seg_model, groups["seg_model"], "seg_model (SAM vision encoder)")
        bundle.seg_projector = _build(lambda: SegProjector(scfg.output_channels, hidden, vcfg.projector_scale))
        _load_into(bundle.seg_projector, groups["seg_projector"], "seg_projector")

    for m in (bundle.model, bundle.clip_projector, bundle.detection_model, bundle.detection_projector, bundle.seg_model, bundle.seg_projector):
        if m is not None:
            _hf_compat.cast_like_from_pretrained(m, dtype, device).eval()
    _check_finite(bundle, folder)
    return bundle


def _check_finite(bundle: VPTBundle, folder: Path) -> None:
    """Refuse weights holding NaN or inf (after the dtype cast, which can overflow too)."""
    named = []
    for prefix in ("", "clip_projector.", "detection_model.", "detection_projector.", "seg_model.", "seg_projector."):
        module = getattr(bundle, prefix[:-1]) if prefix else bundle.model
        if module is not None:
            named += [(prefix + n, p) for n, p in module.named_parameters() if p.is_floating_point()]
    finite = torch.stack([torch.isfinite(p).all() for _, p in named]).tolist()
    bad = [n for (n, _), ok in zip(named, finite) if not ok]
    if bad:
        raise CheckpointError(f"{folder}: {len(bad)} weight tensor(s) hold NaN or inf values: "
                              f"{bad[:10]}{' ...' if len(bad) > 10 else ''}")

