"""Where a request's time to first token goes, hop by hop, through client -> coordinator ->
node -> engine core and back (docs/serving-overhead.md, "The hops of a first token").

The stamps are not in the product: this script copies the package to a scratch directory,
applies ``benchmarks/hop_trace.patch`` there (``cluster/hoptrace.py`` and one ``hop()`` call
per hop), and runs itself against that copy with ``ULTRAKV_HOPTRACE`` naming a directory
where each process (this client, the coordinator, the node, its engine core) writes its
stamps. It then drives a one-node cluster (etcd + coordinator + node, ``LocalCluster``):

* ``sequential``: ``--n`` requests one at a time (64 prompt tokens, 2 output tokens), nothing
  else running: the cost of the hops alone;
* ``rate_R`` (``--rate``): chat-like turns arriving by a Poisson process;
* ``concurrency_C`` (``--concurrency``): C streams kept busy with chat-like turns.

For each run, the median time from the client's call to every stamp, in the order reached.

    python benchmarks/hop_trace.py --model tiny --device cpu
    python benchmarks/hop_trace.py --model llama-1b --device cuda --rate 8 --concurrency 64

Writes benchmarks/results/hop_trace_<device>_<model>.json. Stamps: ``k_*`` the client,
``i_*`` the coordinator's security interceptor (taken by time: it knows no request id yet),
``accept``/``yield`` a client stream on the coordinator, ``c_*`` the coordinator's forward
and its node link, ``acceptB``/``yieldB`` the node's GenerateMany stream, ``n_*`` the node
(``n_add_send`` the request's pipe to its engine core, ``n_reader_step`` the core's step
message read back), ``e_*`` the engine core (``e_delta`` the first token emitted).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATCH = Path(__file__).with_name("hop_trace.patch")


def traced_copy(dest: Path) -> Path:
    """The package, stamps patched in, under ``dest/ultrakv``; returns ``dest``."""
    pkg = dest / "ultrakv"
    pkg.mkdir(parents=True)
    for part in ("cluster", "node", "coordinator", "client"):
        shutil.copytree(ROOT / part, pkg / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "proto" / "ultrakv" / "v1", pkg / "v1")
    subprocess.run(["patch", "-p1", "-s", "-d", str(pkg), "-i", str(PATCH)], check=True)
    return dest


def relaunch(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        copy = traced_copy(Path(tmp) / "src")
        stamps = Path(tmp) / "stamps"
        stamps.mkdir()
        env = {**os.environ, "ULTRAKV_HOPTRACE": str(stamps),
               "PYTHONPATH": os.pathsep.join([str(copy), os.environ.get("PYTHONPATH", "")])}
        return subprocess.call([sys.executable, __file__, "--traced", *argv], env=env)


def main_traced(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_serving as bs
    from common import write
    from ultrakv.client import AsyncClient
    from ultrakv.client.local_cluster import ClusterSpec, LocalCluster

    stamps = os.environ["ULTRAKV_HOPTRACE"]
    client_times: dict[str, tuple[int, int | None]] = {}  # request id -> (call, first token)
    counter = iter(range(1, 1 << 30))

    async def run(client, session: str, ids: list[int], n: int, tag: str) -> None:
        rid = f"{tag}{next(counter)}"
        spec = {"token_ids": ids, "session_id": session, "max_length": n, "temperature": 0.0,
                "ignore_eos": True, "request_id": rid}
        t0, first = time.monotonic_ns(), None
        async for chunk in client.stream(spec, timeout=600):
            if first is None and chunk.token_ids:
                first = time.monotonic_ns()
        client_times[rid] = (t0, first)

    def breakdown(prefix: str) -> dict[str, float]:
        by_request: dict[str, dict[str, int]] = {}
        untagged: list[tuple[int, str]] = []
        for path in glob.glob(f"{stamps}/*.txt"):
            for line in Path(path).read_text().splitlines():
                t, label, key = line.split()
                if label.startswith("i_"):
                    untagged.append((int(t), label))
                elif key.startswith(prefix):
                    by_request.setdefault(key, {}).setdefault(label, int(t))
        untagged.sort()
        offsets: dict[str, list[float]] = {}
        for rid, (t0, t1) in client_times.items():
            if not rid.startswith(prefix) or t1 is None:
                continue
            seen = by_request.setdefault(rid, {})
            for t, label in untagged:  # sequential runs only: concurrent calls overlap
                if t0 <= t <= t1:
                    seen.setdefault(label, t)
            for label, t in seen.items():
                offsets.setdefault(label, []).append((t - t0) / 1e6)
            offsets.setdefault("client_first", []).append((t1 - t0) / 1e6)
        rows = sorted((statistics.median(v), k) for k, v in offsets.items())
        print(f"--- {prefix}")
        previous = 0.0
        for ms, label in rows:
            print(f"{label:16s} {ms:7.2f} ms  (+{ms - previous:5.2f})")
            previous = ms
        return {label: ms for ms, label in rows}

    async def main() -> dict:
        rng = random.Random(0)
        results: dict[str, dict] = {}
        with tempfile.TemporaryDirectory() as tmp:
            spec = ClusterSpec(nodes=1, coordinators=1, data_dir=Path(tmp), model=args.model,
                               device=args.device, port=0, node_args=args.node_args,
                               startup_timeout_s=600, log_dir=Path(tmp) / "logs")
            with LocalCluster(spec) as cluster:
                async with AsyncClient(cluster.address, timeout=600) as client:
                    for i in range(8):
                        await run(client, f"w{i}", [rng.randrange(10, 250) for _ in range(64)], 4, "warm")
                    for i in range(args.n):
                        await run(client, f"s{i}", [rng.randrange(10, 250) for _ in range(64)], 2, "seq")
                        await asyncio.sleep(0.02)
                    results["sequential"] = breakdown("seq")
                    if args.rate:
                        convs = bs.workload(args.sessions, 2, 250, 7, (32, 256), (32, 128))

                        async def conversation(turns) -> None:
                            for t in turns:
                                await run(client, t.session, t.user_ids, t.max_tokens, "rate")
                        tasks = []
                        for turns in convs:
                            tasks.append(asyncio.create_task(conversation(turns)))
                            await asyncio.sleep(rng.expovariate(args.rate / 2))
                        await asyncio.gather(*tasks)
                        results[f"rate_{args.rate:g}"] = breakdown("rate")
                    if args.concurrency:
                        queue = bs.workload(args.concurrency * 2, 2, 250, 9, (32, 256), (32, 128))

                        async def worker() -> None:
                            while queue:
                                for t in queue.pop():
                                    await run(client, t.session, t.user_ids, t.max_tokens, "conc")
                        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
                        results[f"concurrency_{args.concurrency}"] = breakdown("conc")
        return results

    results = asyncio.run(main())
    write(args.output or f"hop_trace_{args.device.split(':')[0]}_{args.model}.json",
          {"model": args.model, "device": args.device, "node_args": args.node_args,
           "median_ms_from_call": results})


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=40, help="sequential requests")
    p.add_argument("--rate", type=float, default=0.0, help="open-loop requests/s (0: no such run)")
    p.add_argument("--sessions", type=int, default=48, help="conversations of the open-loop run")
    p.add_argument("--concurrency", type=int, default=0, help="closed-loop streams (0: no such run)")
    p.add_argument("--output", default="")
    p.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--node-args", nargs=argparse.REMAINDER, default=[])
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse()
    if args.traced:
        main_traced(args)
    else:
        sys.exit(relaunch(sys.argv[1:]))
