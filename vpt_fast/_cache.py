"""What vpt_fast builds once per machine and keeps: compiled kernels, the demo checkpoint.

The root is `$VPT_FAST_CACHE`, else `$XDG_CACHE_HOME/vpt_fast`, else `~/.cache/vpt_fast`.
Every entry is built in a private folder and renamed into place, so a process killed
mid-build leaves no half-built entry and no lock that later processes would wait on;
its private folder is removed by the next build on the same host.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import Callable


def cache_dir() -> Path:
    explicit = os.environ.get("VPT_FAST_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vpt_fast"


def _host() -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname()) or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _remove_stale_builds(final: Path) -> None:
    """Remove private build folders of `final` left by processes of this host that are gone."""
    prefix = f".{final.name}.building-{_host()}-"
    if not final.parent.is_dir():
        return
    for entry in final.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def build_once(final: Path, build: Callable[[Path], None]) -> bool:
    """Make the folder `final` with `build(folder)` unless it exists; True when this call built it.

    `build` fills a private folder next to `final`, which is then renamed to `final`. When
    another process finishes first, its folder is kept and this one's is dropped. A failing
    `build` leaves nothing behind and its exception propagates.
    """
    if final.is_dir():
        return False
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(final)
    private = final.parent / f".{final.name}.building-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
    private.mkdir()
    try:
        build(private)
        try:
            os.rename(private, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(private, ignore_errors=True)  # another process finished first: use its folder
            return False
    except BaseException:
        shutil.rmtree(private, ignore_errors=True)
        raise
    return True
