"""Shared benchmark helpers: machine description, percentiles, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or the architecture where that is unreadable."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    """1-, 5- and 15-minute load averages: on a shared machine they say how far to trust a
    timing."""
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict:
    info = {
        "node": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "cpu": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def host_us(fn, n: int = 200) -> float:
    """Host time per call of ``fn`` (launches only: the GPU runs behind, unsynchronized)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed / n * 1e6


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values) if values else 0.0,
        "p50": pct(values, 50),
        "p95": pct(values, 95),
        "p99": pct(values, 99),
    }


def write(name: str, payload: dict) -> Path:
    out_dir = Path(os.environ.get("ULTRAKV_RESULTS_DIR", RESULTS))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    payload = {
        "benchmark": name.removesuffix(".json"),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        **payload,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return path


async def timed_stream(client, spec: dict) -> tuple[float, dict]:
    """One streamed request through an ``AsyncClient``: (seconds to its first token, or to
    its end when no token came; its final result, empty if none arrived)."""
    sent = time.perf_counter()
    first = None
    result: dict = {}
    async for chunk in client.stream(spec):
        if first is None and chunk.token_ids:
            first = time.perf_counter() - sent
        if chunk.finished:
            result = chunk.result
    return (first if first is not None else time.perf_counter() - sent), result
