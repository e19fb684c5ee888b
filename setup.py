"""Install vpt_fast (the `vpt-fast` console script comes with it).

The compiled kernels (csrc/) are optional. They are built here, as `vpt_fast._C` with CPU and
CUDA kernels, only when the build environment has torch with CUDA and a CUDA toolkit and
VPT_FAST_NO_EXT is unset; pip's isolated build environment has no torch, so ask for it with
`pip install --no-build-isolation .`. Otherwise the install is pure Python and vpt_fast/_ext.py
builds the kernels on first use. Either way the sources travel with the package (vpt_fast/csrc
in wheels; MANIFEST.in puts csrc/ in sdists), so an installed copy can still build them.
"""

import os
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

CSRC = ["csrc/vpt_ops.h", "csrc/vpt_ops.cpp", "csrc/vpt_ops_cuda.cu"]


class BuildPyWithSources(build_py):
    """Copy csrc/ into the built package as vpt_fast/csrc (editable installs read csrc/ in place)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "vpt_fast" / "csrc"
        self.mkpath(str(target))
        for source in CSRC:
            self.copy_file(source, str(target / Path(source).name))


def extension_build():
    """(ext_modules, cmdclass) for vpt_fast._C, or nothing when it cannot or should not be built."""
    if os.environ.get("VPT_FAST_NO_EXT", "") not in ("", "0"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return [], {}
    extension = CUDAExtension(
        name="vpt_fast._C",
        sources=["csrc/vpt_ops.cpp", "csrc/vpt_ops_cuda.cu"],
        # The flags of vpt_fast/_ext.py: no fused multiply-add on the CPU, so float32 kv_splice
        # matches torch bit for bit (the CUDA kernel rounds explicitly).
        extra_compile_args={"cxx": ["-O3", "-ffp-contract=off"], "nvcc": ["-O3"]},
    )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_build()

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
        "transformers>=5.17,<6",
        "tokenizers>=0.22",
        "safetensors",
        "pillow",
        "numpy",
        "tqdm",
        "xgrammar>=0.2.9",  # structured outputs (grammar-constrained answers)
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        "flash": ["flash-attn>=2.6"],
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "prometheus_client>=0.20"],
        "ray": ["ray[data,serve]>=2.60", "fastapi>=0.110", "uvicorn>=0.29", "prometheus_client>=0.20"],
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "matplotlib", "openai", "httpx"],
    },
    entry_points={"console_scripts": ["vpt-fast=vpt_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass={"build_py": BuildPyWithSources, **cmdclass},
)
