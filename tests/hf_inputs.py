"""What a transformers Qwen2-VL processor returns, made with transformers' own parts.

`Qwen2VLProcessor` cannot be built where torchvision is missing (its video half needs it),
as in this CI (transformers refuses a processor without its video processor). `HFInputs`
does what its `__call__` and `apply_chat_template` do, with transformers' tokenizer and
its PIL image processor (`Qwen2VLImageProcessorPil`): the image processor makes
`pixel_values` and `image_grid_thw`, each `<|image_pad|>` of the text is expanded to its
image's token count, the tokenizer pads the batch, and `mm_token_type_ids` marks the image
tokens (1) as the processor's `create_mm_token_type_ids` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vpt_fast import spec


def stock_generate(model, **kwargs):
    """transformers' generate, whatever the instance has (a patched generate is bypassed)."""
    from transformers import Qwen2VLForConditionalGeneration

    with torch.no_grad():
        return Qwen2VLForConditionalGeneration.generate(model, **kwargs)


class HFInputs:
    def __init__(self, folder: Path):
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        config = json.loads((Path(folder) / "preprocessor_config.json").read_text())
        config.pop("image_processor_type", None)
        self.image_processor = Qwen2VLImageProcessorPil(**config)
        self.pad_id = self.tokenizer.convert_tokens_to_ids(spec.IMAGE_PAD)

    def template(self, messages) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def __call__(self, text, images=None, padding_side="left") -> dict[str, torch.Tensor]:
        texts = [text] if isinstance(text, str) else list(text)
        out = {}
        if images:
            pixels = self.image_processor(images=images, return_tensors="pt")
            out.update(pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"])
            merge = self.image_processor.merge_size ** 2
            counts = iter((pixels["image_grid_thw"].prod(-1) // merge).tolist())
            expanded = []
            for t in texts:
                pieces = t.split(spec.IMAGE_PAD)
                t = pieces[0] + "".join(spec.IMAGE_PAD * next(counts) + rest for rest in pieces[1:])
                expanded.append(t)
            texts = expanded
        self.tokenizer.padding_side = padding_side
        encoded = self.tokenizer(texts, padding=True, return_tensors="pt")
        out.update(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                   mm_token_type_ids=(encoded["input_ids"] == self.pad_id).long())
        return out

    def chat(self, conversations, images=None, padding_side="left") -> dict[str, torch.Tensor]:
        """As `processor.apply_chat_template(..., tokenize=True, return_dict=True)`."""
        return self([self.template(c) for c in conversations], images, padding_side)

    def apply_chat_template(self, conversations, *, tokenize: bool, add_generation_prompt: bool, return_dict: bool,
                            return_tensors: str, padding: bool):
        """The processor's own call, as the README's example makes it: the images are the
        {"type": "image", "image": PIL} parts of the messages, in order."""
        from transformers import BatchFeature

        assert tokenize and add_generation_prompt and return_dict and return_tensors == "pt" and padding
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        images = [part["image"] for conv in conversations for m in conv if isinstance(m["content"], list)
                  for part in m["content"] if part.get("type") == "image"]
        return BatchFeature(self.chat(conversations, images or None, self.tokenizer.padding_side))
