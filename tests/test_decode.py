"""Graph-ready decoding: the fixed-shape decode step, captured vs eager."""

import numpy as np
import pytest
import torch
from PIL import Image

from vpt_fast.engine import Engine
from vpt_fast.engine.cache import PagedKVCache
from vpt_fast.engine.decode import DecodeStep
from vpt_fast.engine.runner import Runner


def test_decode_step_equals_prefill_of_one_token(tiny_bundle):
    """The fixed-shape decode path (graph-ready, run uncaptured here) equals the ragged prefill
    path fed the same tokens, action-token overrides included, on scattered blocks."""
    b = tiny_bundle("clip")
    runner = Runner(b.model)
    cfg = b.model.config.text_config
    caches = [PagedKVCache(cfg.num_hidden_layers, 30, 4, cfg.num_key_value_heads, runner.head_dim, torch.float32, "cpu")
              for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(50, 300, (n,), generator=g) for n in (7, 12, 3)]
    tables = [[5, 9, 2, 14, 20], [1, 3, 4, 6, 7, 8], [29, 11, 12]]
    for cache in caches:
        for table, ids in zip(tables, prompts):
            n = len(ids)
            runner.prefill(runner.embed(ids), torch.arange(n).expand(3, -1), cache, torch.tensor(cache.slots(table, 0, n)),
                           torch.tensor([table]), torch.tensor([n]), torch.tensor([0, n]), n)
    step = DecodeStep(runner, caches[0], max_blocks=8, use_graphs=False)
    tokens = [11, 22, 33]
    control = torch.randn(cfg.hidden_size, generator=g)
    width = max(len(t) for t in tables)
    for it in range(3):
        lens = [len(p) + it + 1 for p in prompts]
        positions = [n - 1 for n in lens]
        slots = [caches[0].slots(t, n - 1, n)[0] for t, n in zip(tables, lens)]
        overrides = [None, control if it == 1 else None, None]
        padded = np.array([t + [0] * (step.max_blocks - len(t)) for t in tables])
        logits, hidden = step(tokens, overrides, positions, slots, lens, padded)
        embeds = runner.embed(torch.tensor(tokens))
        if overrides[1] is not None:
            embeds[1] = control
        ref_hidden = runner.prefill(embeds, torch.tensor(positions).expand(3, -1), caches[1], torch.tensor(slots),
                                    torch.tensor([t + [0] * (width - len(t)) for t in tables]), torch.tensor(lens),
                                    torch.arange(4), 1)
        assert (hidden - ref_hidden).abs().max() <= 1e-5
        assert (logits - runner.logits(ref_hidden)).abs().max() <= 1e-4
        assert (caches[0].k - caches[1].k).abs().max() <= 1e-5
        tokens = logits.argmax(-1).tolist()
    # padding rows (a bucket of 4 for 3 rows) wrote nothing: block 0 is still zero
    assert not caches[0].k[:, 0].any()


def test_engine_in_chunks_equals_one_batch(tiny_bundle):
    b = tiny_bundle("region")
    tok = b.tokenizer
    images = [Image.fromarray(np.random.RandomState(i).randint(0, 256, (40 + 9 * i, 50, 3), dtype=np.uint8)) for i in range(5)]
    forced = [tok("<|region_token_start|><|x_1|><|y_2|><|region_token_end|><|im_end|>", add_special_tokens=False)["input_ids"]
              if i % 2 else None for i in range(5)]
    prompts = [f"Question {i}?" for i in range(5)]
    whole = Engine(b, max_batch_size=8).generate(images, prompts, 8, forced)
    chunked = Engine(b, max_batch_size=2).generate(images, prompts, 8, forced)
    assert [r.token_ids for r in whole] == [r.token_ids for r in chunked]
    engine = Engine(b, max_batch_size=2)
    again = [engine.generate(images, prompts, 8, forced) for _ in range(2)]  # the cache is reused across calls
    assert [r.token_ids for r in again[0]] == [r.token_ids for r in again[1]] == [r.token_ids for r in whole]


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["region", "clip"])
def test_captured_decode_equals_eager_on_gpu(tiny_ckpt, variant):
    from vpt_fast.checkpoint import load_vpt_checkpoint

    b = load_vpt_checkpoint(tiny_ckpt(variant), device="cuda")
    tok = b.tokenizer
    images = [Image.fromarray(np.random.RandomState(i).randint(0, 256, (60 + 20 * i, 90, 3), dtype=np.uint8)) for i in range(3)]
    text = "<|clip_action_start|><|clip_action|><|clip_action_end|><|im_end|>" if variant == "clip" else \
        "<|region_token_start|><|x_1|><|y_2|><|region_token_end|><|im_end|>"
    forced = [tok(text, add_special_tokens=False)["input_ids"], None, None]
    eager = Engine(b, cuda_graphs=False).generate(images, ["a", "b", "c"], 12, forced, return_logits=True)
    graphs = Engine(b, cuda_graphs=True).generate(images, ["a", "b", "c"], 12, forced, return_logits=True)
    for e, g in zip(eager, graphs):
        assert e.token_ids == g.token_ids
        assert max((x - y).abs().max().item() for x, y in zip(e.logits, g.logits)) <= 1e-4
    engine = Engine(b)
    sampled = [engine.generate(images, ["a", "b", "c"], 8, forced, do_sample=True, top_k=10, top_p=0.9, seed=3)
               for _ in range(2)]
    assert [r.token_ids for r in sampled[0]] == [r.token_ids for r in sampled[1]]
