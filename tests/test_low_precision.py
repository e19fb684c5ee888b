"""bf16 and float16 runs as faithful as transformers' own: the flash-attention test rule.

On a GPU the engine runs in bfloat16. Its logits must stay as close to the float32 truth of the
same weights as transformers' own low-precision forward stays: the engine's worst error against
a float32 transformers forward is at most `FACTOR` times transformers' worst error at the same
dtype, over the prefill and several decode steps of a prompt past 1,000 tokens.

Random tiny weights give nearly uniform attention, which hides position errors; the query and key
projections are scaled here (`PEAK`) so that attention is peaked and a rotary angle that drifts
with the position shows in the logits. The transformers baselines load a copy of the weights that
transformers itself saved, with its own `from_pretrained(dtype=...)`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import Qwen2VLForConditionalGeneration

import vpt_fast
from vpt_fast.checkpoint import load_vpt_checkpoint
from vpt_fast.reference import two_round_generate
from vpt_cases import rand_image

FACTOR = 2.0
PEAK = 4.0  # query and key projections scaled by this: attention logits x16
SENTENCE = "A man is riding a bicycle on a street next to a tall building with many windows. "
LONG_PROMPT = "<image>\n" + SENTENCE * 60  # about 1,300 text tokens with the tiny tokenizer, plus the image
DTYPES = [torch.bfloat16, torch.float16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _peaked_copy(src: Path, dst: Path) -> Path:
    """A copy of a released-format checkpoint with the text layers' query and key projections scaled."""
    shutil.copytree(src, dst)
    sd = torch.load(dst / "pytorch_model.bin", weights_only=True)
    scaled = [k for k in sd if ".self_attn.q_proj." in k or ".self_attn.k_proj." in k]
    assert scaled, "no query/key projection found"
    for k in scaled:
        sd[k] = sd[k] * PEAK
    torch.save(sd, dst / "pytorch_model.bin")
    return dst


@pytest.fixture(scope="module")
def peaked(tmp_path_factory, tiny_ckpt):
    """variant -> (released-format folder, transformers-saved folder) of peaked weights."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            root = tmp_path_factory.mktemp(f"peaked_{variant}")
            folder = _peaked_copy(tiny_ckpt(variant), root / "released")
            load_vpt_checkpoint(folder).model.save_pretrained(root / "hf")
            cache[variant] = (folder, root / "hf")
        return cache[variant]

    return get


@torch.no_grad()
def _hf_logits(hf_folder: Path, dtype: torch.dtype, bundle, sequence: list[int], images: list, steps: int,
               device: str = "cpu") -> torch.Tensor:
    """transformers' logits (float32, on the CPU) at the last `steps` prediction positions of
    `sequence` (the positions that predicted its last `steps` tokens), images given as PIL
    pictures in the order of their `<|image_pad|>` runs."""
    model = Qwen2VLForConditionalGeneration.from_pretrained(hf_folder, dtype=dtype).to(device).eval()
    pixels, grid = bundle.processor.qwen_inputs(images)
    ids = torch.tensor([sequence])
    pads = ids == bundle.vocab.image_pad
    assert int(pads.sum()) == int(grid.prod(-1).sum()) // 4, "the sequence's image pads do not match its images"
    out = model(input_ids=ids.to(device), pixel_values=pixels.to(device, dtype), image_grid_thw=grid.to(device),
                mm_token_type_ids=pads.int().to(device), attention_mask=torch.ones_like(ids).to(device)).logits[0]
    return out[len(sequence) - 1 - steps: len(sequence) - 1].float().cpu()


def _worst(got: torch.Tensor, truth: torch.Tensor) -> float:
    return float((got.float() - truth).abs().max())


def _check(name: str, ours: torch.Tensor, theirs: torch.Tensor, truth: torch.Tensor) -> None:
    ours_err, theirs_err = _worst(ours, truth), _worst(theirs, truth)
    assert theirs_err > 0, "the low-precision baseline equals float32: the check would prove nothing"
    assert ours_err <= FACTOR * theirs_err, (
        f"{name}: error against float32 {ours_err:.4g}, transformers' own {theirs_err:.4g} "
        f"(ratio {ours_err / theirs_err:.2f} > {FACTOR})")


def _forced_text(bundle, n: int = 8) -> list[int]:
    """n ordinary text tokens to script, so that every pipeline reads the same sequence."""
    ids = bundle.tokenizer(SENTENCE, add_special_tokens=False)["input_ids"]
    return ids[:n]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_engine_prefill_and_decode_match_transformers_precision(peaked, dtype, device):
    folder, hf = peaked("plain")
    image = rand_image(400, 300, seed=1)
    engine = vpt_fast.from_pretrained(folder, dtype=dtype, device=device, max_seq_len=4096)
    forced = _forced_text(engine.bundle)
    (r,) = engine.generate([image], [LONG_PROMPT], max_new_tokens=len(forced), forced_tokens=[forced],
                           return_logits=True)
    assert r.prompt_tokens > 1000 and r.token_ids == forced
    pictures = [engine.bundle.processor.prepare(image)]
    steps = len(r.logits)
    truth = _hf_logits(hf, torch.float32, engine.bundle, r.sequence_ids, pictures, steps)
    theirs = _hf_logits(hf, dtype, engine.bundle, r.sequence_ids, pictures, steps, device)
    _check(f"engine {dtype} on {device}", torch.stack(r.logits).cpu(), theirs, truth)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_transformers_precision(peaked, dtype):
    folder, hf = peaked("plain")
    image = rand_image(400, 300, seed=2)
    bundle = load_vpt_checkpoint(folder, dtype=dtype)
    forced = _forced_text(bundle, 6)
    (r,) = two_round_generate(bundle, [image], [LONG_PROMPT], max_new_tokens=len(forced), forced_tokens=[forced],
                              return_logits=True)
    assert len(r.round1_prompt_ids) > 1000 and r.round1_ids == forced
    sequence, pictures = r.round1_prompt_ids + r.round1_ids, [bundle.processor.prepare(image)]
    truth = _hf_logits(hf, torch.float32, bundle, sequence, pictures, len(forced))
    theirs = _hf_logits(hf, dtype, bundle, sequence, pictures, len(forced))
    _check(f"reference {dtype}", torch.stack(r.round1_logits), theirs, truth)


@pytest.mark.parametrize("pipeline", ["engine", "reference", pytest.param("engine-cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_region_perception_matches_transformers_precision(peaked, pipeline, dtype):
    """The answer after a spliced crop (engine) or a second round (reference), read by
    transformers as the whole final conversation with both images."""
    folder, hf = peaked("region")
    image = rand_image(400, 300, seed=3)
    device = "cuda" if pipeline.endswith("cuda") else "cpu"
    bundle = load_vpt_checkpoint(folder, dtype=dtype, device=device)
    tok = bundle.tokenizer
    forced = tok("<|region_token_start|><|x_2|><|x_4|><|y_1|><|y_5|><|region_token_end|><|im_end|>",
                 add_special_tokens=False)["input_ids"]
    if pipeline.startswith("engine"):
        engine = vpt_fast.Engine(bundle, max_seq_len=4096)
        (r,) = engine.generate([image], [LONG_PROMPT], max_new_tokens=len(forced), answer_max_new_tokens=6,
                               forced_tokens=[forced], return_logits=True)
        (look,) = r.trace
        box, answer = look.boxes[0], r.answer_ids
        sequence, logits = r.sequence_ids, r.logits[len(forced):]  # round 1 is the forced text, <|im_end|> included
        assert r.token_ids[:len(forced)] == forced
    else:
        (r,) = two_round_generate(bundle, [image], [LONG_PROMPT], max_new_tokens=len(forced), answer_max_new_tokens=6,
                                  forced_tokens=[forced], return_logits=True)
        (box,), answer = r.boxes, r.answer_ids
        sequence, logits = r.round2_prompt_ids + answer, r.answer_logits
    assert len(answer) == len(logits) >= 2 and len(sequence) > 1000
    assert sequence[-len(answer):] == answer
    pictures = [bundle.processor.prepare(image), bundle.processor.prepare_crop(image, box)]
    truth = _hf_logits(hf, torch.float32, bundle, sequence, pictures, len(answer))
    theirs = _hf_logits(hf, dtype, bundle, sequence, pictures, len(answer), device)
    _check(f"{pipeline} region answer {dtype}", torch.stack(logits).cpu(), theirs, truth)
