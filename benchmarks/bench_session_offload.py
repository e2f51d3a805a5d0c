"""Session turns whose owner is overloaded: served by the owner vs by the node holding their
prefix (``session_offload``, coordinator/session_offload.py).

Two `tiny` CPU node processes (LocalCluster, real etcd) behind a coordinator run in this
process, once with session offload off and once on, alternating. Node A owns every measured
session and is kept busy by ``--background`` long generations of other sessions it owns
(each restarted when it ends); node B holds the measured sessions' shared system prompt
(a session of its own started with it). ``--sessions`` measured conversations, all at once,
run ``--turns`` turns each, one after another (a short question, a few greedy tokens).

Per run: TTFT p50/p99 of the measured turns as the client sees it (request sent -> first
token chunk: it includes the owner's PrepareTurn and the stand-in's queue and prefill), the
turns served by a stand-in, the background streams' tokens per second (what the owner's own
work got), and whether every measured session's history on its owner equals token for token
what its client received (it must, with or without offload).

The owner's batch is capped (``--max-num-seqs``): ``--background`` at or above it queues
the owner's new turns (the overload case), below it they join the running batch (and the
owner, asked, declines a stand-in while its batch has room).

    python benchmarks/bench_session_offload.py [--max-num-seqs 4 8] [--background 4]

Writes benchmarks/results/session_offload_cpu.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import load_average, machine, summary, timed_stream, write  # noqa: E402
from ultrakv.client import AsyncClient  # noqa: E402
from ultrakv.client.local_cluster import ClusterSpec, LocalCluster  # noqa: E402
from ultrakv.cluster.peer_auth import read_cluster_secret  # noqa: E402
from ultrakv.cluster.peers import PeerChannels  # noqa: E402
from ultrakv.coordinator.health import HealthPolicy  # noqa: E402
from ultrakv.coordinator.server import CoordinatorServer, CoordinatorSettings  # noqa: E402
from ultrakv.v1 import node_pb2 as npb  # noqa: E402


def ids(seed: int, n: int) -> list[int]:
    """``n`` token ids in the byte range, different per seed."""
    return [(seed * 31 + 7 * i) % 250 + 1 for i in range(n)]


def owned_by(ring, node: str, prefix: str, count: int) -> list[str]:
    """``count`` session ids with ``prefix`` whose ring owner is ``node``."""
    out: list[str] = []
    i = 0
    while len(out) < count:
        if ring.lookup(f"{prefix}-{i}") == node:
            out.append(f"{prefix}-{i}")
        i += 1
    return out


async def history(cluster: LocalCluster, node: str, sid: str) -> list[int]:
    peers = PeerChannels(read_cluster_secret(cluster.cluster_secret_file))
    try:
        chunks = [c async for c in peers.stub(f"127.0.0.1:{cluster.node_ports[node]}").ExportSession(
            npb.ExportSessionRequest(session_id=sid, include_kv=False), timeout=60)]
        return list(chunks[0].header.token_ids)
    finally:
        await peers.close()


async def one_run(cluster: LocalCluster, offload: bool, tag: str, args: argparse.Namespace) -> dict:
    server = CoordinatorServer(CoordinatorSettings(
        etcd=cluster.etcd_endpoint, host="127.0.0.1", port=0, session_offload=offload,
        cluster_secret_file=str(cluster.cluster_secret_file),
        health=HealthPolicy(interval_s=1.0, timeout_s=1.0, down_after=5, up_after=2)))
    await server.start()
    try:
        backend = server.backend
        deadline = time.monotonic() + 120
        while len(backend.ring) < 2:
            if time.monotonic() > deadline:
                raise TimeoutError("the coordinator did not see both nodes")
            await asyncio.sleep(0.1)
        owner, holder = sorted(backend.ring.nodes)
        system = ids(1, args.system_tokens)
        async with AsyncClient(server.address, timeout=600) as client:
            await client.clear_cache()
            while any(backend.block_index.num_blocks(n) for n in backend.ring.nodes):
                await asyncio.sleep(0.05)
            [warm] = owned_by(backend.ring, holder, f"warm-{tag}", 1)
            r = await client.process_request({"token_ids": system + ids(2, 8), "session_id": warm,
                                              "max_length": 2, "temperature": 0.0})
            assert r["success"], r
            full = len(system) // 16
            while backend.block_index.num_blocks(holder) < full:
                await asyncio.sleep(0.05)

            stop = asyncio.Event()
            background_tokens = 0

            async def background(sid: str) -> None:
                nonlocal background_tokens
                turn = 0
                while not stop.is_set():
                    async for chunk in client.stream({"token_ids": ids(50 + turn, 8), "session_id": sid,
                                                      "max_length": args.background_tokens,
                                                      "ignore_eos": True, "temperature": 0.0}):
                        background_tokens += len(chunk.token_ids)
                        if stop.is_set():
                            break
                    turn += 1

            busy = [asyncio.create_task(background(s))
                    for s in owned_by(backend.ring, owner, f"busy-{tag}", args.background)]
            await wait_until(lambda: backend.inflight.get(owner, 0) >= args.background, 120)
            started, tokens_before = time.perf_counter(), background_tokens

            ttfts: list[float] = []
            failed = 0
            received: dict[str, list[int]] = {}

            async def conversation(sid: str) -> None:
                nonlocal failed
                received[sid] = []
                for turn in range(args.turns):
                    prompt = (system if turn == 0 else []) + ids(100 + turn, args.question_tokens)
                    ttft, result = await timed_stream(client, {
                        "token_ids": prompt, "session_id": sid, "max_length": args.max_length,
                        "temperature": 0.0})
                    if not result.get("success"):
                        failed += 1
                        return
                    ttfts.append(ttft)
                    received[sid] += prompt + result["response"]["token_ids"]

            sessions = owned_by(backend.ring, owner, f"conv-{tag}", args.sessions)
            await asyncio.gather(*(conversation(s) for s in sessions))
            elapsed = time.perf_counter() - started
            background_rate = (background_tokens - tokens_before) / elapsed
            stop.set()
            for task in busy:
                task.cancel()
            await asyncio.gather(*busy, return_exceptions=True)
            exact = 0
            for sid in sessions:
                exact += await history(cluster, owner, sid) == received[sid]
            served = dict(backend.counters.stand_in_turns)
    finally:
        await server.stop()
    return {"session_offload": offload, "turns": len(ttfts), "failed": failed,
            "ttft_ms": {k: v * 1000 for k, v in summary(ttfts).items()},
            "stand_in_turns": served, "background_tokens_per_s": background_rate,
            "histories_exact": f"{exact}/{len(sessions)}", "seconds": elapsed}


async def wait_until(check: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("timed out")
        await asyncio.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-num-seqs", type=int, nargs="+", default=[4, 8],
                        help="the nodes' running-batch cap; one scenario per value")
    parser.add_argument("--background", type=int, default=4, help="long generations on the owner")
    parser.add_argument("--background-tokens", type=int, default=400, help="tokens per long generation")
    parser.add_argument("--sessions", type=int, default=4, help="measured conversations, all at once")
    parser.add_argument("--turns", type=int, default=4, help="turns per measured conversation")
    parser.add_argument("--system-tokens", type=int, default=512, help="shared system prompt length")
    parser.add_argument("--question-tokens", type=int, default=24, help="tokens per later turn's prompt")
    parser.add_argument("--max-length", type=int, default=8, help="tokens generated per measured turn")
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode and scenario")
    args = parser.parse_args()
    where = machine()
    scenarios: dict = {}
    for cap in args.max_num_seqs:
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "node.yaml"
            config.write_text(f"engine:\n  max_num_seqs: {cap}\n")
            spec = ClusterSpec(nodes=2, coordinators=1, data_dir=Path(tmp), port=0, device="cpu",
                               num_blocks=1024, checkpoint_interval_s=3600.0, log_dir=Path(tmp) / "logs",
                               node_args=["--config", str(config)])
            with LocalCluster(spec) as cluster:
                runs = []
                for repeat in range(args.repeats):  # alternate: neither mode always runs warmer
                    for offload in (False, True):
                        runs.append(asyncio.run(one_run(cluster, offload, f"{cap}-{repeat}-{offload}", args)))
                        print(cap, runs[-1], flush=True)
        scenarios[f"max_num_seqs={cap}"] = {
            "owner_runs": [r for r in runs if not r["session_offload"]],
            "session_offload": [r for r in runs if r["session_offload"]],
        }
    where["load_average_end"] = load_average()
    write("session_offload_cpu.json", {
        "host": where, "model": "tiny", "device": "cpu", "nodes": 2,
        "workload": {"background_generations_on_owner": args.background,
                     "background_tokens": args.background_tokens, "sessions": args.sessions,
                     "turns": args.turns, "system_prompt_tokens": args.system_tokens,
                     "question_tokens": args.question_tokens, "max_length": args.max_length,
                     "block_size": 16, "num_blocks_per_node": 1024},
        "scenarios": scenarios,
        "note": ("shared machine (2 cores, other agents' jobs running, both nodes on the same "
                 "cores): TTFT figures are noisy"),
    })


if __name__ == "__main__":
    main()
