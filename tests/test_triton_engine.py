"""The whole engine on the Triton backend, in Triton's interpreter on the CPU: every op of the
decoder (kv_splice, prefill and decode attention, the norms, the SiLU gate) runs its Triton
kernel, and one request per perception kind gives the torch backend's tokens. The interpreter
is slow: short prompts, few tokens."""

from __future__ import annotations

import pytest
from op_cases import runnable, spy_backends
from vpt_cases import action, rand_image, region, toks

from vpt_fast.engine import Engine
from vpt_fast.ops import _registry
from vpt_fast.ops.decode_attention import IMPLEMENTATIONS as DECODE
from vpt_fast.ops.kv_splice import IMPLEMENTATIONS as SPLICE
from vpt_fast.ops.norm import IMPLEMENTATIONS as NORMS
from vpt_fast.ops.prefill_attention import IMPLEMENTATIONS as PREFILL

OPS = {"kv_splice": SPLICE, "decode_attention": DECODE, "prefill_attention": PREFILL,
       "add_rms_norm": NORMS["add_rms_norm"], "rms_norm": NORMS["rms_norm"], "silu_mul": NORMS["silu_mul"]}
CASES = {"region": region(([2, 4], [1, 5])), "clip": action("clip"), "dino": action("dino"), "sam": action("sam")}


def run(bundle, script: str, backend: str, monkeypatch) -> tuple:
    ran = []
    for op, implementations in OPS.items():
        runnable(op, backend)
        monkeypatch.setitem(_registry._chosen, (op, "cpu"), backend)
        ran.append(spy_backends(monkeypatch, implementations, op))
    engine = Engine(bundle, max_seq_len=512, max_batch_size=2)
    forced = toks(bundle.tokenizer, script)
    (r,) = engine.generate([rand_image(56, 56, 3)], ["<image>\nWhat is it?"], len(forced), [forced],
                           answer_max_new_tokens=3, return_logits=True)
    monkeypatch.undo()
    return r, {name for calls in ran for _, name in calls}, {op for calls in ran for op, _ in calls}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CASES))
def test_the_engine_on_triton_gives_the_torch_backends_tokens(tiny_bundle, kind, monkeypatch):
    bundle = tiny_bundle("region" if kind == "region" else kind)
    want, _, _ = run(bundle, CASES[kind], "torch", monkeypatch)
    got, backends, ops = run(bundle, CASES[kind], "triton", monkeypatch)
    assert backends == {"triton"} and ops >= {"kv_splice", "decode_attention", "prefill_attention", "add_rms_norm",
                                               "silu_mul"}, (backends, ops)
    assert got.token_ids == want.token_ids and [t.kind for t in got.trace] == [kind]
    worst = max((a - b).abs().max().item() for a, b in zip(got.logits, want.logits))
    assert worst <= 1e-3, f"logits differ by {worst:.3g}"
