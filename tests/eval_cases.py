"""A VQA-style JSONL dataset for the evaluation tests, with the rows `Engine.generate` implies.

40 items over random images: 37 good ones (some with answers built from the engine's own
answer, so that the normalized exact match has something to find; one image given as a data:
URL) and 3 bad ones (a missing image, a corrupt image, an empty question).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from vpt_cases import rand_image, region, toks

from vpt_fast.engine import Engine

SCRIPT = region(([1, 3], [0, 2]))  # every item's scripted round 1: one region block
MAX_NEW_TOKENS = 8
BAD = {"bad-missing": "image file not found", "bad-corrupt": "not an image file", "bad-empty": "question is missing"}


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_dataset(folder: Path, bundle, n: int = 40) -> tuple[Path, dict[str, dict]]:
    """(the JSONL path, {id: expected row}) for `n` items (the last 3 bad); error rows are
    expected as {"finish_reason": "error", "error": <a part of the message>}."""
    (folder / "images").mkdir(parents=True)
    good = n - len(BAD)
    images = [rand_image(40 + 7 * (i % 5), 36 + 5 * (i % 4), 1000 + i) for i in range(good)]
    questions = [f"What is in picture {i}?" for i in range(good)]
    forced = toks(bundle.tokenizer, SCRIPT)
    # the published evaluation's prompt, written out: the image, a newline, the question
    results = Engine(bundle, max_batch_size=8).generate(images, [f"<image>\n{q}" for q in questions],
                                                        MAX_NEW_TOKENS, [forced] * good)
    lines, expected = [], {}
    for i, (image, question, result) in enumerate(zip(images, questions, results)):
        item_id = f"item-{i:02d}"
        if i == 5:
            where = data_url(image)
        else:
            where = f"images/{i}.png"
            image.save(folder / where)
        line = {"id": item_id, "image": where, "question": question}
        row = {"id": item_id, "prediction": result.text, "finish_reason": result.finish_reason,
               "trace": [{"kind": t.kind, "image": t.image, "cells": [list(c) for c in t.cells],
                          "boxes": [list(b) for b in t.boxes],
                          "tokens_spliced": t.tokens_spliced, "tokens_rolled_back": t.tokens_rolled_back}
                         for t in result.trace]}
        if i % 3 == 0:  # the engine's answer, dressed up: matches once normalized
            line["answer"] = "The " + result.text + " ."
            row["correct"] = True
        elif i % 3 == 1:  # a list of answers, none of them the engine's
            line["answer"] = ["zebra crossing", "a red bus"]
            row["correct"] = False
        lines.append(line)
        expected[item_id] = row
    (folder / "corrupt.png").write_bytes(b"this is not a PNG file")
    lines += [{"id": "bad-missing", "image": "images/absent.png", "question": "What is this?", "answer": "x"},
              {"id": "bad-corrupt", "image": "corrupt.png", "question": "What is this?"},
              {"id": "bad-empty", "image": "images/0.png", "question": "   "}]
    for item_id, part in BAD.items():
        expected[item_id] = {"finish_reason": "error", "error": part}
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path, expected


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assert_rows(rows: list[dict], expected: dict[str, dict]) -> None:
    """Every expected id exactly once; good rows equal, error rows with their reason."""
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)), "an id was written twice"
    assert set(ids) == set(expected), f"missing {set(expected) - set(ids)}, extra {set(ids) - set(expected)}"
    for row in rows:
        want = expected[row["id"]]
        if want["finish_reason"] == "error":
            assert row["finish_reason"] == "error" and row["prediction"] == "" and row["trace"] == []
            assert want["error"] in row["error"] and row["id"] in row["error"], row
            assert "correct" not in row
        else:
            assert row == want
