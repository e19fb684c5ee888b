"""A cold torch.compile(fullgraph=True) of every public op and of the engine's decode step, in a
fresh process with an empty compile cache (tests/compile_check.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXPECTED = ["kv_splice", "decode_attention", "prefill_attention", "add_rms_norm", "rms_norm", "silu_mul",
            "crop_patch_rows", "crop_patch_embed", "the engine's decode step"]


def test_every_public_op_and_the_decode_step_compile(tmp_path):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("compile_check.py"))], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    compiled = [line.removeprefix("compiled: ") for line in run.stdout.splitlines() if line.startswith("compiled: ")]
    assert compiled == EXPECTED


@pytest.mark.gpu
def test_the_triton_backend_compiles_on_the_gpu(tmp_path):
    """The same with every op on its Triton kernels (on the CPU, Triton's interpreter cannot run
    on the fake tensors compilation traces with, so this needs the GPU)."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), VPT_FAST_BACKEND="triton")
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("compile_check.py")), "cuda"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    compiled = [line.removeprefix("compiled: ") for line in run.stdout.splitlines() if line.startswith("compiled: ")]
    assert compiled == EXPECTED
