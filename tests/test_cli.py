"""The CLI: the README's main command on the demo checkpoint, trace pictures, exit statuses and messages."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from paths import ORIGINAL

from vpt_fast import _ext, tiny
from vpt_fast.cli import main
from vpt_fast.picture import BOX, REENCODE, readable

CLIP_FORCE = "<|clip_action_start|><|clip_action|><|clip_action_end|><|im_end|>"


@pytest.fixture
def own_cache(monkeypatch, tmp_path):
    """A private cache folder for the demo checkpoint; the compiled kernels stay where they are."""
    monkeypatch.setenv("VPT_FAST_BUILD_DIR", str(_ext.build_dir(False).parent))
    monkeypatch.setenv("VPT_FAST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "clip"
    assert main(["make-tiny", str(folder), "--variant", "clip"]) == 0
    return folder


def test_run_without_a_model_scripts_a_region(own_cache, tmp_path, capsys, monkeypatch):
    out = tmp_path / "trace.png"
    args = ["run", "--image", str(ORIGINAL / "region1.png"), "--question", "What is the color of the car?",
            "--mode", "region", "--trace-image", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Its answers are noise" in printed and str(own_cache / "demo") in printed
    assert "looked at region: cells x2-5 y3-5 -> box (41, 129, 291, 452)" in printed
    assert "tokens spliced into the cache" in printed
    answer = next(line for line in printed.splitlines() if line.startswith("answer ("))
    assert answer.isprintable()  # the random model's control characters are escaped
    with Image.open(out) as traced, Image.open(ORIGINAL / "region1.png") as original:
        assert traced.format == "PNG" and traced.width == original.width and traced.height > original.height
        assert traced.getpixel((41, 300)) == BOX  # the box's left edge
        inside_cell = (int(3 * 333 / 8), int(4 * 517 / 8) + 3)
        assert traced.getpixel(inside_cell) != original.convert("RGB").getpixel(inside_cell)  # the named cells are shaded
        caption = np.asarray(traced.convert("L"))[original.height:]
        assert (caption < 128).any()  # the caption has text
    # the demo checkpoint is built once and reused
    monkeypatch.setattr(tiny, "make_tiny_checkpoint", lambda *a, **k: pytest.fail("the demo was rebuilt"))
    assert main(args) == 0
    assert len(list((own_cache / "demo").iterdir())) == 1


def test_folder_batch_both_pipelines(clip_model, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(ORIGINAL / "region1.png", folder / "a.png")
    Image.open(ORIGINAL / "clip.png").convert("RGB").save(folder / "a.jpg")
    outputs = []
    for pipeline in ("engine", "reference"):
        capsys.readouterr()
        trace = tmp_path / pipeline / "trace"
        assert main(["run", "--image", str(folder), "--question", "How many?", "--model", str(clip_model),
                     "--force", CLIP_FORCE, "--pipeline", pipeline, "--max-new-tokens", "6",
                     "--trace-image", str(trace)]) == 0
        printed = capsys.readouterr().out
        assert printed.count("looked at clip: the whole image re-encoded by the clip branch") == 2
        outputs.append([line for line in printed.splitlines() if line.startswith(("round 1", "answer"))])
        pictures = sorted(p.name for p in trace.parent.iterdir())
        assert pictures == ["trace_a_jpg.png", "trace_a_png.png"]  # one each, no overwriting
        with Image.open(trace.parent / "trace_a_png.png") as traced:
            assert traced.getpixel((0, 100)) == REENCODE
    assert outputs[0] == outputs[1]  # the engine answers as the two-round flow does


def test_trace_image_without_suffix_is_png(clip_model, tmp_path):
    assert main(["run", "--image", str(ORIGINAL / "clip.png"), "--question", "Q?", "--model", str(clip_model),
                 "--max-new-tokens", "3", "--trace-image", str(tmp_path / "out")]) == 0
    with Image.open(tmp_path / "out.png") as traced:
        assert traced.format == "PNG"


def test_a_failed_request_exits_1(clip_model, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(ORIGINAL / "clip.png", folder / "good.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    status = main(["run", "--image", str(folder), "--question", "Q?", "--model", str(clip_model), "--max-new-tokens", "3"])
    captured = capsys.readouterr()
    assert status == 1
    assert "failed (error): request 0: " in captured.out and "broken.png: not an image file" in captured.out
    assert captured.out.count("answer (") == 2  # the good image is still answered
    assert "1 of 2 request(s) failed" in captured.err


@pytest.mark.parametrize("extra,message", [
    (["--batch-size", "-1"], "argument --batch-size: must be at least 1, got -1"),
    (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["--batch-size", "two"], "argument --batch-size: expected an integer, got 'two'"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1, got 0"),
    (["--max-seq-len", "1"], "argument --max-seq-len: must be at least 2"),
    (["--max-seq-len", "99999999"], "--max-seq-len: max_seq_len 99999999 is above the model's max_position_embeddings"),
    (["--model", "/nowhere/at/all"], "--model: /nowhere/at/all is not a checkpoint folder"),
    (["--device", "meta"], "--device: device 'meta' is not supported"),
    (["--device", "gpu"], "--device: device 'gpu' is not a torch device"),
    (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    (["--trace-image", "out.jpg"], r"--trace-image must name a .png file"),
    (["--question", "  "], "--question is empty"),
    (["--image", "/no/such.png"], "--image: /no/such.png does not exist"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_usage_errors_exit_2_without_traceback(clip_model, capsys, extra, message):
    args = ["run", "--image", str(ORIGINAL / "clip.png"), "--question", "Q?", "--model", str(clip_model)]
    with pytest.raises(SystemExit) as exited:
        main(args + extra)
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert message in err and "Traceback" not in err
    assert "usage: vpt-fast run" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_on_a_cpu_machine_is_a_usage_error(clip_model, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["run", "--image", str(ORIGINAL / "clip.png"), "--question", "Q?", "--model", str(clip_model),
              "--device", "cuda"])
    assert exited.value.code == 2 and "device 'cuda' is not available here" in capsys.readouterr().err


def test_a_broken_checkpoint_is_one_line_or_a_traceback_with_debug(clip_model, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(clip_model, broken)
    (broken / "pytorch_model.bin").write_bytes(b"")
    args = ["run", "--image", str(ORIGINAL / "clip.png"), "--question", "Q?", "--model", str(broken)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "vpt-fast: error: " in err and "pytorch_model.bin is empty (0 bytes)" in err and "Traceback" not in err
    assert main(["--debug"] + args) == 1
    assert "Traceback" in capsys.readouterr().err
    assert main(args + ["--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_readable_escapes_control_characters():
    assert readable("a\nb\tc\x0b\x00") == "a\\nb\\tc\\x0b\\x00"
    assert readable("caf\u00e9 \u4e2d\u6587 \U0001f600") == "caf\u00e9 \u4e2d\u6587 \U0001f600"
    assert readable("x\u202ey") == "x\\u202ey"  # a right-to-left override would reorder the line


@pytest.mark.parametrize("extra,message", [
    (["--model", "/nowhere/at/all"], "--model: /nowhere/at/all is not a checkpoint folder"),
    (["--device", "meta"], "--device: device 'meta' is not supported"),
    (["--allowed-local-media-path", "/no/such/folder"], "is not a folder"),
    (["--port", "0"], "argument --port: must be at least 1"),
    (["--limit-mm-per-prompt", "image=2,video=1"], "only images have a limit here (image=N)"),
    (["--limit-mm-per-prompt", '{"image": -1}'], "the image limit must be an integer >= 0, got -1"),
])
def test_serve_usage_errors(capsys, extra, message):
    with pytest.raises(SystemExit) as exited:
        main(["serve"] + extra)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and message in err and "usage: vpt-fast serve" in err
