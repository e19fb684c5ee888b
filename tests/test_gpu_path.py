"""The GPU path, checked where it can be without a GPU (and on one, with `-m gpu`): every call
runs under the model's device, decode graphs are captured when the engine is built, the
defaults fit the model, and a machine without Triton hears nothing about it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_inputs import HFInputs
from vpt_cases import rand_image

import vpt_fast
from vpt_fast import SamplingParams
from vpt_fast.engine import AsyncEngine, Engine, GraphCapture
from vpt_fast.engine import decode as decode_module
from vpt_fast.engine import scheduler
from vpt_fast.ops import _registry

REPO = Path(__file__).resolve().parents[1]
PARAMS = SamplingParams(max_new_tokens=4)


# ----------------------------------------------------------------------------- the device guard


class GuardSpy:
    """Stands for `device_guard`: records the device of every guard entered."""

    def __init__(self):
        self.entered: list[torch.device] = []

    def __call__(self, device):
        @contextlib.contextmanager
        def guard():
            self.entered.append(torch.device(device))
            yield

        return guard()


def test_every_engine_entry_runs_under_the_model_device(tiny_bundle, monkeypatch):
    spy = GuardSpy()
    monkeypatch.setattr(scheduler, "device_guard", spy)
    engine = Engine(tiny_bundle("region"))
    assert spy.entered == [engine.device]  # the cache and the graphs are made under it
    for name, call in (("add_request", lambda: engine.add_request(None, "Hi?", PARAMS)),
                       ("step", engine.step),
                       ("abort", lambda: engine.abort(0)),
                       ("generate", lambda: engine.generate([None], ["Hi?"], max_new_tokens=2))):
        spy.entered.clear()
        call()
        assert spy.entered and set(spy.entered) == {engine.device}, name
    spy.entered.clear()
    server = AsyncEngine(engine)
    try:
        server.generate(None, "Hi?", PARAMS, timeout=60)
    finally:
        server.shutdown()
    assert spy.entered and set(spy.entered) == {engine.device}  # the loop thread's steps


def test_the_guard_sets_the_cuda_device_and_nothing_else(monkeypatch):
    made = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: made.append(d) or contextlib.nullcontext())
    with _registry.device_guard("cuda:1"):
        pass
    assert made == [torch.device("cuda:1")]
    assert isinstance(_registry.device_guard("cpu"), contextlib.nullcontext)
    assert made == [torch.device("cuda:1")]


# ----------------------------------------------------------------------------- graphs at build


class FakeGraph:
    def __init__(self, step, buf):
        self.step, self.buf, self.replays = step, buf, 0

    def replay(self):
        self.replays += 1
        self.step._body(self.buf)


def test_eager_capture_covers_every_bucket_so_serving_never_captures(tiny_bundle, monkeypatch):
    """On the CPU the capture itself is replaced by a replay of the eager body: what is checked is
    which buckets are captured, when, and that steps only replay."""
    captured = []

    def fake_capture(self, buf):
        captured.append(buf.tokens.shape[0])
        return FakeGraph(self, buf)

    monkeypatch.setattr(decode_module.DecodeStep, "_capture", fake_capture)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 1000 * len(captured))
    engine = Engine(tiny_bundle("region"), max_batch_size=5)
    assert engine.graph_capture is None  # the CPU: no graphs
    engine._decoder.use_graphs = True
    engine.graph_capture = GraphCapture(*engine._decoder.capture(engine.max_batch_size))
    assert captured == [8, 4, 2, 1]  # the largest first, so the others fit in its pool
    assert engine.graph_capture.buckets == (1, 2, 4, 8) and engine.graph_capture.bytes == 4000
    plain = Engine(tiny_bundle("region"), max_batch_size=5)
    images = [rand_image(30 + 5 * i, 40, i) for i in range(5)]
    prompts = [f"Question {i}?" for i in range(5)]
    got = engine.generate(images, prompts, max_new_tokens=6, return_logits=True)
    want = plain.generate(images, prompts, max_new_tokens=6, return_logits=True)
    assert captured == [8, 4, 2, 1] and engine._decoder.captures == 4  # nothing captured while serving
    assert sum(g.replays for g in engine._decoder._graphs.values()) > 0
    for a, b in zip(got, want):
        assert a.token_ids == b.token_ids
        assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))


def test_capture_option_is_checked(tiny_bundle):
    with pytest.raises(ValueError, match="capture_graphs must be 'eager' or 'lazy', got 'soon'"):
        Engine(tiny_bundle("region"), capture_graphs="soon")


# ----------------------------------------------------------------------------- defaults that fit the model


def test_max_seq_len_defaults_to_what_the_model_takes(tiny_bundle):
    from transformers import Qwen2VLForConditionalGeneration

    bundle = tiny_bundle("region")
    assert Engine(bundle).max_seq_len == 4096
    config = bundle.model.config
    config_short = type(config).from_dict(config.to_dict())
    config_short.text_config.max_position_embeddings = 1024
    short = Qwen2VLForConditionalGeneration(config_short).eval()
    engine = vpt_fast.accelerate(short, bundle.tokenizer, patch=False)
    assert engine.max_seq_len == 1024
    assert engine.generate([None], ["Hi?"], max_new_tokens=2)[0].finish_reason in ("stop", "length")


@pytest.fixture(scope="module")
def merge_one(tmp_path_factory, tiny_ckpt):
    """A stock Qwen2-VL whose vision tower merges 1x1 patches (spatial_merge_size 1), saved by
    transformers with a matching preprocessor_config.json."""
    from transformers import Qwen2VLForConditionalGeneration

    src = tiny_ckpt("plain")
    base = Qwen2VLForConditionalGeneration.from_pretrained(src)
    config = type(base.config).from_dict(base.config.to_dict())
    config.vision_config.spatial_merge_size = 1
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in base.state_dict().items() if own[k].shape == v.shape}, strict=False)
    folder = tmp_path_factory.mktemp("merge_one") / "model"
    model.save_pretrained(folder)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, folder / f.name)
    pre = json.loads((src / "preprocessor_config.json").read_text())
    pre["merge_size"] = 1
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    return folder


def test_a_tokenizer_alone_takes_image_settings_from_the_model(merge_one):
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(merge_one).eval()
    inputs = HFInputs(merge_one)
    x = inputs.chat([[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]],
                    [rand_image(84, 56, 1)])
    with torch.no_grad():
        want = Qwen2VLForConditionalGeneration.generate(model, **x, max_new_tokens=8, do_sample=False)
    vpt_fast.accelerate(model, inputs.tokenizer)  # no image processor: merge size 1 from the vision config
    try:
        got = model.generate(**x, max_new_tokens=8, do_sample=False)
    finally:
        vpt_fast.restore(model)
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------- without Triton


def test_without_triton_nothing_is_said_about_it(tiny_ckpt):
    script = ("import sys; sys.modules['triton'] = None\n"
              "import vpt_fast\n"
              "from vpt_fast.ops import _registry\n"
              f"engine = vpt_fast.from_pretrained({str(tiny_ckpt('region'))!r}, max_seq_len=256)\n"
              "print(engine.generate([None], ['Hi?'], max_new_tokens=2)[0].finish_reason)\n"
              "print(_registry.triton_status('kv_splice')('cuda'))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[1].startswith("triton is not installed")
    assert "Triton" not in done.stderr and "triton" not in done.stderr, done.stderr


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_equals_the_eager_step_bitwise(tiny_ckpt, dtype):
    from vpt_fast.checkpoint import load_vpt_checkpoint

    bundle = load_vpt_checkpoint(tiny_ckpt("region"), dtype=dtype, device="cuda")
    graphs = Engine(bundle, max_batch_size=8)
    eager = Engine(bundle, max_batch_size=8, cuda_graphs=False)
    assert graphs.graph_capture is not None and graphs.graph_capture.buckets == (1, 2, 4, 8)
    captures = graphs._decoder.captures
    images = [rand_image(40 + 8 * i, 56, i) for i in range(6)]
    prompts = [f"Question {i}?" for i in range(6)]
    got = graphs.generate(images, prompts, max_new_tokens=8, return_logits=True)
    want = eager.generate(images, prompts, max_new_tokens=8, return_logits=True)
    assert graphs._decoder.captures == captures  # nothing captured while serving
    for a, b in zip(got, want):
        assert a.token_ids == b.token_ids
        assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))


@pytest.mark.gpu
def test_an_engine_on_the_second_gpu(tiny_ckpt):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    from vpt_fast.checkpoint import load_vpt_checkpoint

    torch.cuda.set_device(0)
    on_one = Engine(load_vpt_checkpoint(tiny_ckpt("region"), dtype=torch.bfloat16, device="cuda:1"))
    on_zero = Engine(load_vpt_checkpoint(tiny_ckpt("region"), dtype=torch.bfloat16, device="cuda:0"))
    images, prompts = [rand_image(60, 48, 1)], ["What is it?"]
    a = on_one.generate(images, prompts, max_new_tokens=8)[0]
    b = on_zero.generate(images, prompts, max_new_tokens=8)[0]
    assert a.token_ids == b.token_ids
    assert torch.cuda.current_device() == 0
