"""vpt_fast: Visual Perception Token inference for Qwen2-VL."""

__version__ = "0.1.0"
