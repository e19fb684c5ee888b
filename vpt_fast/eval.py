"""Dataset evaluation: a JSONL of questions about images in, a JSONL of answers out.

Each input line is {"id", "image", "question", "answer"?}: `image` is a path (relative to
the JSONL file's folder) or a `data:` URL, or a list of them for a question about several
images (shown in that order before the question, unless the question places each with
`<image>`). Each output line is {"id", "prediction",
"finish_reason", "trace", "correct"?, "error"?}: `trace` lists what the model looked at
(kind, grid cells, pixel boxes, tokens spliced and rolled back, milliseconds); `correct`
(where an answer is given) is the normalized exact match:

    lower-case; punctuation removed; the articles a, an, the dropped; whitespace collapsed;
    the prediction is correct when it equals the answer (or any answer of a list) so normalized.

The run is resumable: ids already in the output file are skipped, rows are appended and
flushed batch by batch, so a crash loses at most the batch in flight (a line it cut short is
dropped when the run resumes). A line that is not valid JSON, lacks a question, or names an
unreadable image becomes a row with finish reason "error" and the reason, never a crash (a
line with no usable id is named "line N"); `retry_errors` asks those again. A line repeating
an earlier id is left out and counted.

Here one engine answers the batches; `vpt_fast.scale_out.evaluate_with_ray` runs the same
items over a pool of Ray actors and writes the same rows.
"""

from __future__ import annotations

import json
import os
import re
import string
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Lower-case, no punctuation, no articles (a, an, the), single spaces."""
    text = ARTICLES.sub(" ", text.lower().translate(PUNCTUATION))
    return " ".join(text.split())


def is_correct(prediction: str, answer: Any) -> bool:
    answers = answer if isinstance(answer, list) else [answer]
    return normalize(prediction) in {normalize(str(a)) for a in answers}


@dataclass
class Item:
    """One input line: what to ask, or why it cannot be asked."""

    id: str
    images: list[str] | None = None  # each an absolute path or a data: URL
    question: str | None = None
    answer: Any = None
    error: str | None = None


def read_items(path: str | os.PathLike, limit: int | None = None) -> list[Item]:
    """The items of a JSONL file, in order (the first `limit`, blank lines aside); a bad line
    becomes an item carrying its error, named "line N" when it has no usable id."""
    path = Path(path)
    folder = path.resolve().parent
    items: list[Item] = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if limit is not None and len(items) >= limit:
                break
            if raw.strip():
                items.append(_item(raw, n, folder))
    return items


def _item(raw: bytes, n: int, folder: Path) -> Item:
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return Item(f"line {n}", error=f"line {n} is not UTF-8 text: {e}")
    except json.JSONDecodeError as e:
        return Item(f"line {n}", error=f"line {n} is not valid JSON: {e}")
    if not isinstance(record, dict):
        return Item(f"line {n}", error=f"line {n} is not a JSON object but a {type(record).__name__}")
    raw_id = record.get("id")
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or not str(raw_id):
        return Item(f"line {n}", error=f"line {n} has no id (a non-empty string or an integer), got {raw_id!r}")
    item_id = str(raw_id)
    question, image = record.get("question"), record.get("image")
    where = f"{item_id} (line {n})"
    if not isinstance(question, str) or not question.strip():
        return Item(item_id, error=f"{where}: the question is missing or empty")
    images = image if isinstance(image, list) else [image]
    if not images or not all(isinstance(one, str) and one for one in images):
        return Item(item_id, error=f"{where}: the image is missing (a path or a data: URL, or a non-empty list of them)")
    images = [one if one.startswith("data:") else str((folder / one).resolve()) for one in images]
    return Item(item_id, images, question, record.get("answer"))


def done_ids(out: str | os.PathLike, retry_errors: bool = False) -> set[str]:
    """Ids already answered in an output file. A last line cut short by a crash is removed;
    with retry_errors, so are the error rows (their items are asked again)."""
    out = Path(out)
    if not out.exists():
        return set()
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        out.write_bytes(data)
    ids, kept = set(), []
    for line in data.decode("utf-8").splitlines(keepends=True):
        try:
            row = json.loads(line)
            row_id, failed = str(row["id"]), row.get("finish_reason") == "error"
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            kept.append(line)
            continue
        if retry_errors and failed:
            continue
        ids.add(row_id)
        kept.append(line)
    if retry_errors:
        private = out.with_name(out.name + ".retry")
        private.write_text("".join(kept), encoding="utf-8")
        os.replace(private, out)
    return ids


def batches(items: list[Item], size: int) -> Iterator[list[Item]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Answerer:
    """Turns items into output rows with one engine (locally, or inside a Ray actor).

    mode: the trigger sentence added to each question (`chat.with_trigger`); force: round-1
    tokens scripted for every request, as text (as `vpt-fast run --force`)."""

    def __init__(self, engine, mode: str | None = None, max_new_tokens: int = 64, force: str | None = None):
        from .media import MediaPolicy
        from .prompt import script_ids

        self.engine = engine
        self.mode = mode
        self.max_new_tokens = max_new_tokens
        self.media = MediaPolicy()
        self.forced = script_ids(engine.bundle.tokenizer, force) if force else None

    def rows(self, items: list[Item]) -> list[dict[str, Any]]:
        from .chat import question_prompt
        from .media import MediaError
        from .preprocess import load_image

        out: list[dict[str, Any] | None] = [None] * len(items)
        todo, images, prompts = [], [], []
        for k, item in enumerate(items):
            if item.error is not None:
                out[k] = _error_row(item, item.error)
                continue
            loaded = []
            try:  # here, not in the engine, so that a message names the item (and the image, among several)
                for j, image in enumerate(item.images):
                    where = f"image {j}: " if len(item.images) > 1 else ""
                    loaded.append(self.media.load(image) if image.startswith("data:") else load_image(image))
            except (MediaError, OSError, ValueError) as e:
                out[k] = _error_row(item, f"{item.id}: {where}{e}")
                continue
            todo.append(k)
            images.append(loaded)
            prompts.append(question_prompt(item.question, self.mode, len(loaded)))
        if todo:
            results = self.engine.generate(images, prompts, self.max_new_tokens, [self.forced] * len(todo))
            for k, result in zip(todo, results):
                out[k] = _result_row(items[k], result)
        return out


def _result_row(item: Item, result) -> dict[str, Any]:
    row = {"id": item.id, "prediction": result.text, "finish_reason": result.finish_reason, "trace": [t.to_json(timing=False) for t in result.trace]}
    if result.error:
        row["error"] = f"{item.id}: {result.error}"
    if item.answer is not None and result.finish_reason != "error":
        row["correct"] = is_correct(result.text, item.answer)
    return row


def _error_row(item: Item, message: str) -> dict[str, Any]:
    return {"id": item.id, "prediction": "", "finish_reason": "error", "trace": [], "error": message}


@dataclass
class Summary:
    """What one run did: rows written (`items`, `errors` among them), items skipped, the
    normalized exact matches among the rows with an answer, perceptions by kind."""

    items: int = 0
    skipped: int = 0  # already in the output
    repeated: int = 0  # input lines whose id an earlier line has
    errors: int = 0
    with_answers: int = 0
    correct: int = 0
    perceptions: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    workers: list[dict[str, str]] = field(default_factory=list)  # Ray: the actors that answered
    caches: dict[str, int] = field(default_factory=dict)  # what the engine's caches saved this run (`cache_counts`)

    def add(self, row: dict[str, Any]) -> None:
        self.items += 1
        self.errors += row["finish_reason"] == "error"
        if "correct" in row:
            self.with_answers += 1
            self.correct += bool(row["correct"])
        self.perceptions.update(t["kind"] for t in row["trace"])

    def text(self) -> str:
        lines = [f"items: {self.items} answered now, {self.skipped} already in the output; errors: {self.errors}"]
        if self.repeated:
            lines.append(f"left out: {self.repeated} line(s) repeating an earlier id")
        if self.with_answers:
            lines.append(f"accuracy (normalized exact match, over the answered items that have an answer): "
                         f"{self.correct}/{self.with_answers} = {self.correct / self.with_answers:.4f}")
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.perceptions.items())) or "none"
        lines.append(f"perceptions: {kinds}")
        rate = self.items / self.seconds if self.seconds else 0.0
        lines.append(f"{rate:.2f} requests/s over {self.seconds:.1f} s")
        c = self.caches
        if c.get("prompt_tokens"):
            lines.append(f"prompt tokens: {c['prompt_tokens']}, {c['cached_prompt_tokens']} of them from the prefix cache "
                         f"({c['cached_prompt_tokens'] / c['prompt_tokens']:.0%}); images encoded: "
                         f"{c['vision_encoder_images']} ({c['vision_cache_hits']} more from the encoder cache)")
        for w in self.workers:
            lines.append(f"worker: node {w['node'][:12]} pid {w['pid']} CUDA_VISIBLE_DEVICES={w['cuda_visible_devices']!r}")
        return "\n".join(lines)


def write_rows(out_file, rows: Iterable[dict[str, Any]], summary: Summary, progress) -> None:
    for row in rows:
        out_file.write(json.dumps(row, ensure_ascii=False) + "\n")
        summary.add(row)
        progress.update(1)
    out_file.flush()
    os.fsync(out_file.fileno())


@dataclass
class Pending:
    """What is left to answer: the items of the input not in the output yet (the first of
    each id), how many are answered already, how many lines repeat an earlier id."""

    items: list[Item]
    done: int
    repeated: int


def pending(data: str | os.PathLike, out: str | os.PathLike, limit: int | None = None,
            retry_errors: bool = False) -> Pending:
    items = read_items(data, limit)
    done = done_ids(out, retry_errors)
    todo, seen, answered, repeated = [], set(), 0, 0
    for item in items:
        if item.id in seen:
            repeated += 1
        elif item.id in done:
            answered += 1
        else:
            todo.append(item)
        seen.add(item.id)
    return Pending(todo, answered, repeated)


def evaluate(data: str | os.PathLike, out: str | os.PathLike, engine, *, mode: str | None = None,
             batch_size: int = 8, limit: int | None = None, max_new_tokens: int = 64, force: str | None = None,
             retry_errors: bool = False, progress: bool = True) -> Summary:
    """Answer the items of `data` (the first `limit`) not yet in `out` with `engine`, appending
    their rows to `out` batch by batch; the summary counts what this call answered.
    retry_errors: ask again the items whose rows in `out` are errors (those rows are removed)."""
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    left = pending(data, out, limit, retry_errors)
    summary = Summary(skipped=left.done, repeated=left.repeated)
    answerer = Answerer(engine, mode, max_new_tokens, force)
    start, before = time.perf_counter(), cache_counts(engine)
    with open(out, "a", encoding="utf-8") as f, tqdm(total=len(left.items), desc="items", disable=not progress) as bar:
        for batch in batches(left.items, batch_size):
            write_rows(f, answerer.rows(batch), summary, bar)
    summary.seconds = time.perf_counter() - start
    summary.caches = {k: v - before[k] for k, v in cache_counts(engine).items()}
    return summary


CACHE_COUNTS = ("prompt_tokens", "computed_prompt_tokens", "cached_prompt_tokens", "vision_encoder_images",
                "vision_cache_hits")


def cache_counts(engine) -> dict[str, int]:
    """The engine's counters of prompt tokens and images, computed and found in its caches."""
    stats = engine.stats()
    return {k: stats[k] for k in CACHE_COUNTS}
