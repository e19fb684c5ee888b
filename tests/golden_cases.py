"""The records of data/original/golden.json (the published VPT class's outputs), grouped by call.

A record whose "batch" is set was made in one call with the other rows of that batch (in the
order of their "row"); every other record was made alone. `GROUPS` maps a call's name to its
(record name, record) pairs; `check_record` compares what our code produced with one record; `KNOWN_DIFFERENCES` names
the records where the published code departs from VPT_SPEC.
"""

from __future__ import annotations

import json

import torch
from paths import ORIGINAL

ROUND1_MAX_NEW_TOKENS = 24
ROUND2_MAX_NEW_TOKENS = 16
LOGIT_TOL = 1e-4  # fp32 on the CPU; answer_first_logits are stored rounded to 5 decimals

GOLDEN: dict[str, dict] = json.loads((ORIGINAL / "golden.json").read_text())

# Records where the published class itself departs from VPT_SPEC, so our code differs on purpose:
# record name -> (the fields that differ, why). Checked apart, as strict expected failures.
KNOWN_DIFFERENCES = {
    "batch_clip_4": (("round1_ids",), (
        "the published prepare_inputs_for_generation rewrites, in place, the token after every "
        "<|clip_action_start|> of the running batch into <|clip_action|> -- also in a row that has already "
        "finished, so this row's closing <|im_end|> becomes <|clip_action|> (round 1 [start, action] instead "
        "of [start, <|im_end|>]) while another row is still generating; alone the row keeps <|im_end|>. "
        "Our code keeps a finished row as it finished (VPT_SPEC 7: round 1 ends at <|im_end|>; 9: a request's "
        "result does not depend on its batch). Round 2 and the answer are the same.")),
}


def _groups() -> dict[str, list[tuple[str, dict]]]:
    groups: dict[str, list[tuple[str, dict]]] = {}
    for name, rec in GOLDEN.items():
        groups.setdefault(rec.get("batch", name), []).append((name, rec))
    for rows in groups.values():
        rows.sort(key=lambda item: item[1].get("row", 0))
    return groups


GROUPS = _groups()


def call_inputs(tokenizer, records):
    """(images, prompts, forced token ids or None) of one call."""
    images = [ORIGINAL / rec["image"] for _, rec in records]
    prompts = [rec["prompt"] for _, rec in records]
    forced = [tokenizer.convert_tokens_to_ids(rec["forced_tokens"]) if rec["forced_tokens"] else None
              for _, rec in records]
    return images, prompts, forced


def _close(name, key, got: list[torch.Tensor], want: list[float] | None):
    if want is None:
        return
    assert len(got) == len(want), f"{name}: {len(got)} {key} steps, published {len(want)}"
    worst = (torch.stack([g.max().float() for g in got]) - torch.tensor(want)).abs().max().item()
    assert worst <= LOGIT_TOL, f"{name}: {key} differ by {worst:.3g}"


def check_record(name: str, rec: dict, *, round1_prompt_ids, round1_ids, round2_prompt_ids, answer_ids, boxes,
                 round1_logits, answer_logits, kind, skip=()):
    """What our code produced for one request against the published record: ids exactly, boxes
    equal, logits within LOGIT_TOL (round 1's top logits where recorded, round 2's top logits and
    all of its first step's). `skip`: fields left unchecked."""
    assert round1_prompt_ids == rec["round1_prompt_ids"], f"{name}: round-1 prompt"
    assert round2_prompt_ids == rec["round2_prompt_ids"], f"{name}: round-2 prompt"
    if "round1_ids" not in skip:
        assert round1_ids == rec["round1_ids"], f"{name}: round 1"
    assert answer_ids == rec["answer_ids"], f"{name}: answer"
    if "perception" in rec:
        assert kind == rec["perception"], f"{name}: perception"
    if "boxes" in rec:
        assert [list(b) for b in boxes] == rec["boxes"], f"{name}: boxes"
    if "round1_ids" not in skip:
        _close(name, "round-1 top logits", round1_logits, rec.get("round1_top_logit"))
    if rec["answer_ids"]:
        _close(name, "answer top logits", answer_logits, rec["answer_top_logit"])
        worst = (answer_logits[0].float() - torch.tensor(rec["answer_first_logits"])).abs().max().item()
        assert worst <= LOGIT_TOL, f"{name}: first answer logits differ by {worst:.3g}"
    else:
        assert not answer_logits, f"{name}: an answer where the published flow has none"
