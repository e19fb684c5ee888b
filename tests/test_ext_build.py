"""Building once per machine: private build folders renamed into place, stale ones removed,
and a process killed while compiling the extension never blocks the next one."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vpt_fast import _ext
from vpt_fast._cache import build_once, cache_dir

LOAD = "from vpt_fast import _ext; ops = _ext.load(); print('LOADED', ops is not None, flush=True)"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_build_once_renames_a_private_folder(tmp_path):
    final = tmp_path / "entry"
    seen = []

    def build(folder: Path):
        seen.append(folder)
        assert folder.parent == tmp_path and folder.name.startswith(".entry.building-")
        (folder / "data").write_text("done")

    assert build_once(final, build) is True
    assert (final / "data").read_text() == "done" and not seen[0].exists()
    assert build_once(final, lambda folder: pytest.fail("built twice")) is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_a_failed_build_leaves_nothing(tmp_path):
    def build(folder: Path):
        (folder / "half").write_text("x")
        raise RuntimeError("compiler said no")

    with pytest.raises(RuntimeError, match="compiler said no"):
        build_once(tmp_path / "entry", build)
    assert list(tmp_path.iterdir()) == []


def test_stale_private_folders_are_removed_live_ones_kept(tmp_path):
    host = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())
    stale = tmp_path / f".entry.building-{host}-{_dead_pid()}-abcd"
    live = tmp_path / f".entry.building-{host}-{os.getppid()}-abcd"
    elsewhere = tmp_path / f".entry.building-otherhost-{_dead_pid()}-abcd"
    for folder in (stale, live, elsewhere):
        folder.mkdir()
        (folder / "lock").write_text("")
    build_once(tmp_path / "entry", lambda folder: None)
    assert not stale.exists() and live.exists() and elsewhere.exists()


def test_another_process_finishing_first_wins(tmp_path):
    final = tmp_path / "entry"

    def build(folder: Path):
        (folder / "mine").write_text("")
        final.mkdir()  # another process renames its folder into place meanwhile
        (final / "theirs").write_text("")

    assert build_once(final, build) is False
    assert [p.name for p in final.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("VPT_FAST_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "vpt_fast"
    monkeypatch.setenv("VPT_FAST_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_build_folder_names_differ_by_sources_and_interpreter(monkeypatch, tmp_path):
    monkeypatch.setenv("VPT_FAST_BUILD_DIR", str(tmp_path))
    here = _ext.build_dir(False)
    assert here.parent == tmp_path and here == _ext.build_dir(False)
    monkeypatch.setattr(sys, "executable", "/some/other/venv/bin/python")
    assert _ext.build_dir(False) != here
    monkeypatch.undo()
    monkeypatch.setenv("VPT_FAST_BUILD_DIR", str(tmp_path))
    monkeypatch.setattr(_ext, "CXX_FLAGS", ["-O2"])
    assert _ext.build_dir(False) != here


def _toolchain() -> str | None:
    from torch.utils.cpp_extension import verify_ninja_availability

    try:
        verify_ninja_availability()
    except RuntimeError:
        return "ninja is not installed"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler})"
    return None


@pytest.mark.skipif(_toolchain() is not None, reason="no toolchain to build the extension with")
def test_the_extension_builds_and_reports(monkeypatch):
    """Where ninja and a compiler exist the extension must load (the op tests skip its backend
    otherwise, so a broken build fails here)."""
    if _ext.disabled():
        pytest.skip("the extension is disabled by VPT_FAST_NO_EXT")
    ops = _ext.load()
    assert ops is not None, _ext.available("cpu")
    assert _ext.available("cpu") is True and _ext.load() is ops and _ext.source_dir() is not None
    cuda = _ext.available("cuda")
    assert cuda is True or (isinstance(cuda, str) and cuda.startswith("built without CUDA"))
    if torch.version.cuda is None:
        assert cuda == "built without CUDA (torch has no CUDA)"
    assert isinstance(_ext.available("mps"), str)
    monkeypatch.setenv("VPT_FAST_NO_EXT", "1")
    assert _ext.load() is None and _ext.available("cpu") == "disabled by VPT_FAST_NO_EXT"
    monkeypatch.setenv("VPT_FAST_NO_EXT", "0")
    assert _ext.available("cpu") is True


def _compiling(session: int) -> bool:
    """Whether ninja runs in the process group `session` (it starts the compilers at once, each in
    a process group of its own)."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.getpgid(int(proc.name)) == session:
                if (proc / "cmdline").read_bytes().split(b"\0")[0].endswith(b"ninja"):
                    return True
        except (OSError, ProcessLookupError):
            continue
    return False


@pytest.mark.skipif(_toolchain() is not None, reason="no ninja to build the extension with")
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the compiler through /proc")
def test_a_build_killed_midway_does_not_block_the_next(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "VPT_FAST_NO_EXT"}
    env["VPT_FAST_BUILD_DIR"] = str(tmp_path)
    first = subprocess.Popen([sys.executable, "-c", LOAD], env=env, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".*.building-*/build.ninja")):
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the build never started"
        time.sleep(0.05)
    while not _compiling(first.pid):  # kill it while the compiler runs
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the compiler never started"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    _, err = first.communicate()
    assert "compiling its C++" in err
    (left,) = tmp_path.glob(".*.building-*")
    assert (left / "lock").exists()  # the build lock torch leaves behind is private to the killed process

    second = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=180)
    assert "LOADED True" in second.stdout, second.stderr
    assert second.stderr.count("compiling its C++") == 1
    assert not left.exists()
    (built,) = tmp_path.iterdir()
    assert built.name.startswith("torch") and (built / f"{_ext.NAMESPACE}.so").is_file()

    third = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=120)
    assert "LOADED True" in third.stdout and "compiling" not in third.stderr
