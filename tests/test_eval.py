"""`vpt-fast eval` without Ray: the rows equal `Engine.generate`'s answers, bad lines become
error rows, a killed run resumes with no id lost or written twice. (`test_ray.py` runs the
same dataset on a Ray cluster.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from eval_cases import BAD, MAX_NEW_TOKENS, SCRIPT, assert_rows, data_url, read_rows, write_dataset
from vpt_cases import rand_image, toks

from vpt_fast.cli import main
from vpt_fast.engine import Engine
from vpt_fast.eval import evaluate, is_correct, normalize, read_items
from vpt_fast.scale_out import RayWorker

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_bundle):
    return write_dataset(tmp_path_factory.mktemp("eval"), tiny_bundle("region"))


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return Engine(tiny_bundle("region"), max_batch_size=8)


def test_normalized_exact_match():
    assert normalize("  The Cat, on   the MAT! ") == "cat on mat"
    assert normalize("An apple.") == "apple" and normalize("theatre") == "theatre" and normalize("") == ""
    assert is_correct("a dog", "Dog.") and is_correct("2", 2) and is_correct("red", ["blue", "The red"])
    assert not is_correct("dogs", "dog") and not is_correct("cat", ["dog", "bird"]) and not is_correct("", "x")


def test_local_eval_equals_the_engine_with_error_rows(dataset, engine, tmp_path):
    data, expected = dataset
    out = tmp_path / "results.jsonl"
    summary = evaluate(data, out, engine, batch_size=6, max_new_tokens=MAX_NEW_TOKENS, force=SCRIPT, progress=False)
    rows = read_rows(out)
    assert_rows(rows, expected)
    assert [r["id"] for r in rows] == list(expected)  # in input order
    assert summary.items == 40 and summary.errors == 3 and summary.skipped == 0
    graded = [w for w in expected.values() if "correct" in w]
    assert summary.with_answers == len(graded) and summary.correct == sum(w["correct"] for w in graded)
    assert summary.perceptions == {"region": 37}
    text = summary.text()
    assert "errors: 3" in text and f"{summary.correct}/{summary.with_answers}" in text and "region 37" in text
    again = evaluate(data, out, engine, force=SCRIPT, progress=False)  # everything answered: nothing to do
    assert again.items == 0 and again.skipped == 40 and read_rows(out) == rows


def test_bad_lines_become_error_rows(tmp_path, engine):
    image = rand_image(40, 30, 7)
    image.save(tmp_path / "ok.png")
    lines = [b'{"id": "a", "image": "ok.png", "question": "Q?"}', b"{not json", b"[1, 2]",
             b'{"image": "ok.png", "question": "Q?"}', b'{"id": true, "image": "ok.png", "question": "Q?"}',
             b'\xff\xfe{"id": "bytes"}', b"", b'{"id": 7, "question": "Q?"}',
             b'{"id": "a", "image": "ok.png", "question": "the same id again"}',
             json.dumps({"id": "u", "image": data_url(image), "question": "Q?"}).encode(),
             b'{"id": "v", "image": "data:image/png;base64,AAAA", "question": "Q?"}',
             b'{"id": "w", "image": "ok.png", "question": "Q?"}']
    data = tmp_path / "data.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out.jsonl"
    summary = evaluate(data, out, engine, batch_size=4, max_new_tokens=4, progress=False)
    rows = {r["id"]: r for r in read_rows(out)}
    errors = {k: r["error"] for k, r in rows.items() if r["finish_reason"] == "error"}
    assert errors.keys() == {"line 2", "line 3", "line 4", "line 5", "line 6", "7", "v"}
    assert "not valid JSON" in errors["line 2"] and "not a JSON object" in errors["line 3"]
    assert "has no id" in errors["line 4"] and "has no id" in errors["line 5"] and "UTF-8" in errors["line 6"]
    assert "7 (line 8): the image is missing" in errors["7"] and errors["v"].startswith("v: ")
    assert summary.repeated == 1 and summary.items == 10 and summary.errors == 7
    (want,) = engine.generate([image], ["<image>\nQ?"], 4)
    assert rows["a"]["prediction"] == rows["u"]["prediction"] == rows["w"]["prediction"] == want.text
    assert [item.id for item in read_items(data, limit=3)] == ["a", "line 2", "line 3"]


def test_a_cut_line_is_dropped_and_errors_are_retried(dataset, engine, tmp_path):
    source, expected = dataset
    shutil.copytree(source.parent, tmp_path / "set")
    data, out = tmp_path / "set" / source.name, tmp_path / "results.jsonl"
    run = dict(max_new_tokens=MAX_NEW_TOKENS, force=SCRIPT, progress=False)
    evaluate(data, out, engine, batch_size=8, limit=10, **run)
    assert [r["id"] for r in read_rows(out)] == list(expected)[:10]
    with open(out, "a") as f:  # a crash in the middle of a write
        f.write('{"id": "item-10", "predic')
    summary = evaluate(data, out, engine, batch_size=8, **run)
    assert summary.skipped == 10 and summary.items == 30
    assert_rows(read_rows(out), expected)
    assert evaluate(data, out, engine, **run).items == 0  # error rows count as answered...
    shutil.copy(data.parent / "images" / "1.png", data.parent / "images" / "absent.png")
    retried = evaluate(data, out, engine, retry_errors=True, **run)  # ...unless asked again
    assert retried.items == 3 and retried.errors == 2
    rows = {r["id"]: r for r in read_rows(out)}
    assert len(rows) == 40 == len(read_rows(out))
    (want,) = engine.generate([data.parent / "images" / "1.png"], ["<image>\nWhat is this?"], MAX_NEW_TOKENS,
                              [toks(engine.bundle.tokenizer, SCRIPT)])
    assert rows["bad-missing"]["finish_reason"] == want.finish_reason and rows["bad-missing"]["prediction"] == want.text
    assert rows["bad-missing"]["correct"] is is_correct(want.text, "x")
    assert rows["bad-corrupt"]["finish_reason"] == rows["bad-empty"]["finish_reason"] == "error"


def test_a_killed_run_resumes_with_no_id_lost_or_repeated(dataset, tiny_ckpt, tmp_path):
    data, expected = dataset
    out = tmp_path / "results.jsonl"
    command = [sys.executable, "-m", "vpt_fast.cli", "eval", str(data), "--out", str(out), "--model",
               str(tiny_ckpt("region")), "--force", SCRIPT, "--max-new-tokens", str(MAX_NEW_TOKENS), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command + ["--batch-size", "1"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 6:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    written = out.read_bytes().count(b"\n")
    assert 6 <= written < 40
    done = subprocess.run(command + ["--batch-size", "7"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{written} already in the output" in done.stdout and "errors: " in done.stdout
    assert_rows(read_rows(out), expected)


def test_the_ray_worker_equals_the_engine_without_ray(dataset, tiny_ckpt, tmp_path):
    """The actor class alone (what the GPU machine checks, as Ray cannot be installed there)."""
    data, expected = dataset
    worker = RayWorker(str(tiny_ckpt("region")), {"max_batch_size": 8}, None, MAX_NEW_TOKENS, SCRIPT, device="cpu")
    items = read_items(data)
    from dataclasses import asdict

    got = worker({"item": [json.dumps(asdict(item)) for item in items]})
    assert_rows([json.loads(row) for row in got["row"]], expected)
    where = json.loads(got["worker"][0])
    assert where["pid"] == str(os.getpid()) and where["node"] == "local"


@pytest.mark.gpu
def test_the_ray_worker_equals_the_engine_on_gpu(tiny_ckpt, tmp_path):
    import torch

    from vpt_fast.checkpoint import load_vpt_checkpoint

    bundle = load_vpt_checkpoint(tiny_ckpt("region"), device="cuda", dtype=torch.bfloat16)
    data, expected = write_dataset(tmp_path, bundle, n=20)
    worker = RayWorker(str(tiny_ckpt("region")), {"max_batch_size": 8}, None, MAX_NEW_TOKENS, SCRIPT)
    assert worker.answerer.engine.bundle.model.device.type == "cuda"
    from dataclasses import asdict

    got = worker({"item": [json.dumps(asdict(item)) for item in read_items(data)]})
    assert_rows([json.loads(row) for row in got["row"]], expected)


@pytest.mark.parametrize("argv,message", [
    (["eval", "absent.jsonl", "--out", "o.jsonl"], "is not a file"),
    (["eval", "DATA", "--out", "DATA"], "must not be the input file"),
    (["eval", "DATA", "--out", "nowhere/o.jsonl"], "does not exist"),
    (["eval", "DATA", "--out", "o.jsonl", "--workers", "2"], "need --ray"),
    (["eval", "DATA", "--out", "o.jsonl", "--batch-size", "0"], "at least 1"),
    (["eval", "DATA", "--out", "o.jsonl", "--gpus-per-worker", "-1", "--ray"], "at least 0"),
    (["serve", "--replicas", "2"], "need --ray"),
])
def test_eval_usage_errors(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "DATA").write_text("")
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_eval_cli_prints_a_summary(dataset, tiny_ckpt, tmp_path, capsys):
    data, expected = dataset
    out = tmp_path / "r.jsonl"
    code = main(["eval", str(data), "--out", str(out), "--model", str(tiny_ckpt("region")), "--force", SCRIPT,
                 "--max-new-tokens", str(MAX_NEW_TOKENS), "--limit", "12", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0 and "items: 12 answered now, 0 already in the output; errors: 0" in printed
    assert "perceptions: region 12" in printed and "requests/s" in printed and str(out) in printed
    assert [r["id"] for r in read_rows(out)] == list(expected)[:12]
    assert set(BAD) <= set(expected)


def test_nothing_but_scale_out_imports_ray():
    code = ("import sys, pkgutil, importlib, vpt_fast\n"
            "names = [m.name for m in pkgutil.walk_packages(vpt_fast.__path__, 'vpt_fast.')]\n"
            "for name in names:\n"
            "    if name != 'vpt_fast.scale_out' and not name.endswith('__main__'):\n"
            "        importlib.import_module(name)\n"
            "import vpt_fast.scale_out\n"
            "print(len(names), sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    count, loaded = done.stdout.split(" ", 1)
    assert int(count) > 20 and loaded.strip() == "[]"


def test_a_list_of_images_per_question(tmp_path, engine):
    """`"image": [...]`: the images shown in order before the question (or where it places them),
    as Engine.generate answers them; one unreadable image of three ends that item alone, naming it."""
    images = [rand_image(40 + 8 * k, 30, 50 + k) for k in range(3)]
    for k, image in enumerate(images):
        image.save(tmp_path / f"{k}.png")
    lines = [{"id": "two", "image": ["0.png", data_url(images[1])], "question": "Which is wider?"},
             {"id": "placed", "image": ["2.png", "0.png"], "question": "Is <image> like <image>?"},
             {"id": "broken", "image": ["0.png", "1.png", "missing.png"], "question": "Q?"},
             {"id": "empty", "image": [], "question": "Q?"}]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out.jsonl"
    summary = evaluate(data, out, engine, max_new_tokens=4, progress=False)
    rows = {r["id"]: r for r in read_rows(out)}
    want = engine.generate([images[:2], [images[2], images[0]]], ["<image><image>\nWhich is wider?",
                                                                  "Is <image> like <image>?"], 4)
    assert [rows["two"]["prediction"], rows["placed"]["prediction"]] == [w.text for w in want]
    assert rows["two"]["finish_reason"] == want[0].finish_reason != "error"
    assert rows["broken"]["finish_reason"] == "error"
    assert rows["broken"]["error"].startswith("broken: image 2: image file not found")
    assert "the image is missing" in rows["empty"]["error"] and summary.errors == 2
