"""Cluster benchmark: what the coordinator adds, what it carries, how fast it heals.

* routing overhead: the same greedy request (session turns, ``Process``) sent serially
  through the coordinator and straight to the node that owns the session (every node also
  serves the client API); added latency = coordinator - direct, at p50 and p99;
* requests/s through one coordinator: sessionless ``Process`` requests, ``--concurrency``
  in flight, for ``--seconds``;
* recovery from a node kill: sessions spread over the nodes, the one holding the most is
  SIGKILLed, and every one of its sessions sends its next turn at once; time from the kill
  to the first and to the last of those turns answered (with zero failures required).

    python benchmarks/bench_cluster.py [--nodes 3] [--requests 300] [--seconds 5]

Writes benchmarks/results/cluster_cpu.json (tiny model on CPU: the figures are the
cluster's own overheads, the model costs next to nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import summary, write  # noqa: E402
from ultrakv.client import AsyncClient, Client  # noqa: E402
from ultrakv.client.local_cluster import ClusterSpec, LocalCluster  # noqa: E402

MAX_LENGTH = 8


def _spec(i: int, turn: int, session: bool = True) -> dict:
    spec = {"token_ids": [(i * 7 + turn * 3 + k) % 250 + 1 for k in range(19)],
            "max_length": MAX_LENGTH, "temperature": 0.0, "ignore_eos": True}
    if session:
        spec["session_id"] = f"bench-{i}"
    return spec


def routing_overhead(cluster: LocalCluster, requests: int) -> dict:
    """Serial session turns via the coordinator vs. straight to the owning node."""
    via, direct = [], []
    with Client(cluster.address, timeout=30) as coord:
        owners = {i: coord.process_request(_spec(i, 0))["node"] for i in range(requests)}
        stats = {n["node_id"]: n["address"] for n in coord.stats()["nodes"]}
        nodes = {node: Client(address, timeout=30) for node, address in stats.items()}
        try:
            for turn in (1, 2):
                for i in range(requests):
                    # alternate which path goes first so neither always meets a warmer cache
                    paths = [(coord, via), (nodes[owners[i]], direct)]
                    if (i + turn) % 2:
                        paths.reverse()
                    for client, sink in paths:
                        spec = _spec(i, turn, session=False)
                        spec["session_id"] = f"bench-{i}-{'c' if sink is via else 'd'}"
                        started = time.perf_counter()
                        r = client.process_request(spec)
                        sink.append(time.perf_counter() - started)
                        assert r["success"], r["error"]
        finally:
            for client in nodes.values():
                client.close()
    v, d = summary(via), summary(direct)
    return {"requests": len(via), "max_length": MAX_LENGTH,
            "coordinator_ms": {k: x * 1000 for k, x in v.items()},
            "direct_ms": {k: x * 1000 for k, x in d.items()},
            "added_ms": {k: (v[k] - d[k]) * 1000 for k in ("p50", "p99")}}


async def throughput(cluster: LocalCluster, seconds: float, concurrency: int) -> dict:
    done = failed = 0
    latencies: list[float] = []
    end = time.monotonic() + seconds
    async with AsyncClient(cluster.address, timeout=30) as client:
        async def worker(w: int) -> None:
            nonlocal done, failed
            i = 0
            while time.monotonic() < end:
                started = time.perf_counter()
                r = await client.process_request(_spec(w * 100_000 + i, 0, session=False))
                latencies.append(time.perf_counter() - started)
                done += r["success"]
                failed += not r["success"]
                i += 1

        started = time.monotonic()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        wall = time.monotonic() - started
    return {"concurrency": concurrency, "seconds": wall, "requests": done, "failed": failed,
            "requests_per_s": done / wall,
            "latency_ms": {k: x * 1000 for k, x in summary(latencies).items()}}


async def recovery(cluster: LocalCluster, sessions: int) -> dict:
    async with AsyncClient(cluster.address, timeout=60) as client:
        firsts = await asyncio.gather(*(client.process_request(
            {**_spec(i, 1), "session_id": f"rec-{i}"}) for i in range(sessions)))
        owner = {f"rec-{i}": r["node"] for i, r in enumerate(firsts)}
        victim = max(set(owner.values()), key=list(owner.values()).count)
        moved = [i for i in range(sessions) if owner[f"rec-{i}"] == victim]
        await asyncio.sleep(1.5)  # a checkpoint round
        killed_at = time.monotonic()
        cluster.kill_node(victim, signal.SIGKILL)
        finished: list[float] = []

        async def turn(i: int) -> dict:
            r = await client.process_request({**_spec(i, 2), "session_id": f"rec-{i}"})
            finished.append(time.monotonic() - killed_at)
            return r

        results = await asyncio.gather(*(turn(i) for i in moved))
    failed = sum(not r["success"] for r in results)
    hits = sum(r["cached_tokens"] > 0 for r in results)
    return {"victim": victim, "sessions_on_victim": len(moved), "failed": failed,
            "first_answer_after_kill_s": min(finished), "all_answered_after_kill_s": max(finished),
            "cache_hits_on_new_owner": hits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sessions", type=int, default=90)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        spec = ClusterSpec(nodes=args.nodes, data_dir=Path(tmp), port=0, device="cpu",
                           num_blocks=4096,
                           lease_ttl_s=2, checkpoint_interval_s=1.0, log_dir=Path(tmp) / "logs")
        with LocalCluster(spec) as cluster:
            overhead = routing_overhead(cluster, args.requests)
            print("routing overhead", overhead["added_ms"])
            rate = asyncio.run(throughput(cluster, args.seconds, args.concurrency))
            print(f"{rate['requests_per_s']:.0f} requests/s through one coordinator")
            heal = asyncio.run(recovery(cluster, args.sessions))
            print("recovery", heal)
    write("cluster_cpu.json", {"model": "tiny", "device": "cpu", "nodes": args.nodes,
                               "routing_overhead": overhead, "throughput": rate,
                               "recovery": heal})


if __name__ == "__main__":
    main()
