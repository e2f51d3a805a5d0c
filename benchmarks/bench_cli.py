"""Command-line and node start-up times: what a user waits for before anything happens.

* ``ultrakv --help`` and ``ultrakv stats`` (against a running server): wall time of the
  whole process, ``--runs`` times each;
* a node's start, split into phases inside one fresh interpreter: interpreter and CLI
  import, engine imports (torch), engine build (model weights and the KV pool), server start
  (gRPC, health, reflection); and end to end: ``ultrakv serve`` spawned until its gRPC
  health check answers SERVING.

    python benchmarks/bench_cli.py [--runs 5] [--out cli_cpu.json]

Writes benchmarks/results/cli_cpu.json. The figures depend on the machine's load: the file
records the load average next to them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import write  # noqa: E402
from ultrakv.client import Client  # noqa: E402
from ultrakv.cluster.etcd_server import free_port  # noqa: E402

# One node's start, phase by phase, in a fresh interpreter; prints one JSON line.
_NODE_PHASES = """
import asyncio, json, time
t0 = time.perf_counter()
import ultrakv.client.cli
t1 = time.perf_counter()
from ultrakv.node.config import EngineConfig
from ultrakv.node.engine import Engine
from ultrakv.node.server import NodeServer, ServerSettings
t2 = time.perf_counter()
engine = Engine(EngineConfig(model="tiny", device="cpu"))
t3 = time.perf_counter()

async def start():
    server = NodeServer(engine, ServerSettings(host="127.0.0.1", port=0, grace_period_s=0.1))
    await server.start()
    t4 = time.perf_counter()
    await server.stop()
    return t4

t4 = asyncio.run(start())
engine.shutdown()
print(json.dumps({"cli_import_s": t1 - t0, "engine_imports_s": t2 - t1,
                  "engine_build_s": t3 - t2, "server_start_s": t4 - t3}))
"""


def _ultrakv() -> list[str]:
    exe = shutil.which("ultrakv")
    return [exe] if exe else [sys.executable, "-m", "ultrakv.client.cli"]


def _wall(argv: list[str], runs: int) -> dict:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return {"runs": runs, "min_s": min(times), "median_s": statistics.median(times),
            "max_s": max(times)}


def _serve_until_healthy(port: int, data_dir: Path) -> tuple[subprocess.Popen, float]:
    started = time.perf_counter()
    proc = subprocess.Popen([*_ultrakv(), "serve", "--port", str(port), "--data-dir", str(data_dir),
                             "--http-port", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with Client(f"127.0.0.1:{port}", timeout=2) as client:
        while not client.health()["healthy"]:
            if proc.poll() is not None:
                raise RuntimeError(f"ultrakv serve exited with {proc.returncode}")
            if time.perf_counter() - started > 300:
                proc.kill()
                raise RuntimeError("ultrakv serve was not SERVING after 300 s")
            time.sleep(0.05)
    return proc, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per measurement (default 5)")
    parser.add_argument("--out", default="cli_cpu.json", help="file under benchmarks/results/")
    args = parser.parse_args()

    load_before = os.getloadavg()
    results: dict = {"help": _wall([*_ultrakv(), "--help"], args.runs)}
    phases = []
    for _ in range(args.runs):
        out = subprocess.run([sys.executable, "-c", _NODE_PHASES], check=True,
                             capture_output=True, text=True).stdout
        phases.append(json.loads(out.strip().splitlines()[-1]))
    results["node_start_phases_median_s"] = {
        key: statistics.median(p[key] for p in phases) for key in phases[0]}
    serve_times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            port = free_port()
            proc, elapsed = _serve_until_healthy(port, Path(tmp) / str(i))
            serve_times.append(elapsed)
            if i == 0:  # `stats` needs a server: measure it against the first one
                results["stats"] = _wall([*_ultrakv(), "stats", "--address", f"127.0.0.1:{port}"],
                                         args.runs)
            proc.terminate()
            proc.wait(timeout=60)
    results["serve_until_serving"] = {"runs": args.runs, "min_s": min(serve_times),
                                      "median_s": statistics.median(serve_times),
                                      "max_s": max(serve_times)}
    results["load_average"] = {"before": load_before, "after": os.getloadavg()}
    print(json.dumps(results, indent=2))
    write(args.out, results)


if __name__ == "__main__":
    main()
