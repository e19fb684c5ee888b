"""Shared benchmark plumbing: the card, versions, timers, copy bandwidth, result files."""

from __future__ import annotations

import json
import os
import re
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(os.environ.get("VPT_FAST_RESULTS") or Path(__file__).parent / "results")


def card(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict:
    import transformers

    env = {"card": card(device), "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, reps: int, warmup: int = 1) -> list[float]:
    """Wall seconds of each of `reps` calls of fn(), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Measured device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    times = timed(lambda: dst.copy_(src), device, reps, warmup=2)
    return 2 * n * 4 / statistics.median(times)


def write_results(name: str, env: dict, rows: list[dict], markdown: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_" + re.sub(r"[^A-Za-z0-9.-]+", "_", env["card"]).strip("_")
    js = RESULTS / f"{stem}.json"
    md = RESULTS / f"{stem}.md"
    js.write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
    md.write_text(f"Card: {env['card']}; torch {env['torch']}, transformers {env['transformers']}, "
                  f"triton {env['triton']}; {env['time']}\n\n{markdown}\n")
    return js, md


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = []
    for r in rows:
        cells = []
        for key, _ in columns:
            v = r.get(key)
            cells.append(f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v)))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *body])
