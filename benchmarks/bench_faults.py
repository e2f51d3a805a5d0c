"""Fault benchmark: a soak, then every fault scenario of the fault-injection suite, under a
conversational load against a supervised cluster (3 nodes, 2 coordinators, embedded etcd).

* soak: the load runs ``--soak`` seconds with no fault; etcd's and each node's resident
  memory, etcd's database and WAL sizes are sampled every few seconds (flat = bounded growth);
* per scenario (``tests/fault_workload.py``): failed/total requests, sessions with lost or
  rewritten acknowledged turns (stored history against what the client was told, token for
  token), p99 latency before and during the fault, recovery time (fault until every client
  was served again), cache hit rate after recovery. The load holds ``--hold`` seconds past
  recovery.

    python benchmarks/bench_faults.py [--clients 16] [--soak 120] [--hold 10] [--scenarios a,b]

Writes benchmarks/results/faults_cpu.json (tiny model on CPU: the figures are the
cluster's fault handling, the model costs next to nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))  # the shared fault workload

from common import write  # noqa: E402
from fault_workload import SCENARIOS, ConversationLoad, run_scenario  # noqa: E402
from ultrakv.client.local_cluster import ClusterSpec, LocalCluster  # noqa: E402
from ultrakv.client.supervision import RestartPolicy  # noqa: E402


def _rss_mib(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _dir_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def _sample(cluster: LocalCluster, started: float) -> dict:
    member = cluster.spec.data_dir / "etcd" / "member-data" / "member"
    return {"t_s": round(time.monotonic() - started, 1),
            "etcd_rss_mib": round(_rss_mib(cluster.etcd.pid), 1),
            "etcd_db_mib": round(_dir_mib(member / "snap"), 2),
            "etcd_wal_mib": round(_dir_mib(member / "wal"), 2),
            "node_rss_mib": {n: round(_rss_mib(p.pid), 1) for n, p in cluster.nodes.items()},
            "checkpoints_mib": round(_dir_mib(cluster.spec.data_dir / "checkpoints"), 2)}


async def soak(cluster: LocalCluster, clients: int, seconds: float) -> dict:
    samples = []
    started = time.monotonic()
    async with ConversationLoad(cluster.addresses, "soak", clients) as load:
        while time.monotonic() - started < seconds:
            samples.append(_sample(cluster, started))
            await asyncio.sleep(max(1.0, seconds / 24))
    samples.append(_sample(cluster, started))
    turns = [t for c in load.conversations for t in c.turns]
    # after the first quarter (caches and pools warm), how much did each figure still grow?
    warm = samples[len(samples) // 4]
    last = samples[-1]
    return {"seconds": seconds, "turns": len(turns), "failed": sum(not t.ok for t in turns),
            "sessions": len(load.conversations),
            "growth_after_warmup": {
                "etcd_rss_mib": round(last["etcd_rss_mib"] - warm["etcd_rss_mib"], 1),
                "etcd_db_mib": round(last["etcd_db_mib"] - warm["etcd_db_mib"], 2),
                "etcd_wal_mib": round(last["etcd_wal_mib"] - warm["etcd_wal_mib"], 2),
                "node_rss_mib": {n: round(last["node_rss_mib"].get(n, 0) - v, 1)
                                 for n, v in warm["node_rss_mib"].items()}},
            "samples": samples}


async def scenarios(cluster: LocalCluster, names: list[str], clients: int, hold_s: float
                    ) -> list[dict]:
    out = []
    for name in names:
        try:
            result = (await run_scenario(cluster, name, clients, hold_s=hold_s)).as_dict()
        except Exception as exc:  # one scenario's failure is a result, not the end of the run
            result = {"scenario": name, "error": repr(exc)}
        print(result, flush=True)
        out.append(result)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--soak", type=float, default=120.0, help="seconds (0 = skip)")
    parser.add_argument("--hold", type=float, default=10.0,
                        help="seconds of load past each scenario's recovery")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma list out of {','.join(SCENARIOS)}")
    args = parser.parse_args()
    names = [n for n in args.scenarios.split(",") if n]
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        raise SystemExit(f"--scenarios must be among {sorted(SCENARIOS)}, got {unknown}")
    with tempfile.TemporaryDirectory() as tmp:
        spec = ClusterSpec(nodes=3, coordinators=2, data_dir=Path(tmp), port=0, device="cpu",
                           num_blocks=1024, lease_ttl_s=2, checkpoint_interval_s=1.0,
                           log_dir=Path(tmp) / "logs",
                           restart=RestartPolicy(initial_backoff_s=0.2, max_backoff_s=2.0,
                                                 max_restarts=10, window_s=600))
        with LocalCluster(spec) as cluster:
            soaked = asyncio.run(soak(cluster, args.clients, args.soak)) if args.soak else None
            if soaked:
                print("soak", soaked["growth_after_warmup"], flush=True)
            results = asyncio.run(scenarios(cluster, names, args.clients, args.hold))
    write("faults_cpu.json", {"model": "tiny", "device": "cpu", "nodes": 3, "coordinators": 2,
                              "clients": args.clients, "turns_per_conversation": 6,
                              "soak": soaked, "scenarios": results})


if __name__ == "__main__":
    main()
