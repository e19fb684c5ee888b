"""The README's main command: `vpt-fast run` on the embedded tiny model, and `make-tiny`."""

from PIL import Image
from paths import ORIGINAL

from vpt_fast.cli import main


def test_run_without_a_model_scripts_a_region(tmp_path, capsys):
    out = tmp_path / "trace.png"
    assert main(["run", "--image", str(ORIGINAL / "region1.png"), "--question", "What is the color of the car?",
                 "--mode", "region", "--trace-image", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Its answers are noise" in printed
    assert "looked at: region boxes (41, 129, 291, 452)" in printed
    assert "tokens spliced" in printed
    with Image.open(out) as traced, Image.open(ORIGINAL / "region1.png") as original:
        assert traced.size == original.size
        assert traced.getpixel((41, 300))[:3] == (255, 40, 40)  # the box's left edge is drawn


def test_folder_batch_both_pipelines_and_make_tiny(tmp_path, capsys):
    folder = tmp_path / "ckpt"
    assert main(["make-tiny", str(folder), "--variant", "clip"]) == 0
    assert (folder / "config.json").exists() and (folder / "pytorch_model.bin").exists()
    force = "<|clip_action_start|><|clip_action|><|clip_action_end|><|im_end|>"
    outputs = []
    for pipeline in ("engine", "reference"):
        capsys.readouterr()
        assert main(["run", "--image", str(ORIGINAL), "--question", "How many?", "--model", str(folder),
                     "--force", force, "--pipeline", pipeline, "--max-new-tokens", "6"]) == 0
        printed = capsys.readouterr().out
        assert printed.count("looked at: clip") == 2  # both images of the folder
        outputs.append([line for line in printed.splitlines() if line.startswith(("round 1", "answer"))])
    assert outputs[0] == outputs[1]  # the engine answers as the two-round flow does
