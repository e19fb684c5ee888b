"""Install vpt_fast (pure Python; the `vpt-fast` console script comes with it)."""
from setuptools import find_packages, setup

setup(
    name="vpt_fast",
    version="0.1.0",
    description="Single-pass Visual Perception Token inference for Qwen2-VL",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["vpt_fast", "vpt_fast.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=5.17,<5.18",
        "tokenizers>=0.22",
        "safetensors",
        "pillow",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "matplotlib"],
    },
    entry_points={"console_scripts": ["vpt-fast=vpt_fast.cli:main"]},
)
