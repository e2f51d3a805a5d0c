"""Memory soak: does a cluster at steady state stay flat?

etcd + 2 nodes + 1 coordinator (supervised processes, ``tiny`` on CPU), each node's live set
bounded by configuration (``tests/soak_workload.py``: idle-session TTL, session and replica
budgets, checkpoint-directory budget), under clients that keep opening 3-turn
conversations, so sessions are created and expire all the time. After ``--warmup`` turns,
etcd's resident memory and database size, each node's and the coordinator's resident memory
and the checkpoint directory are sampled every ``--every`` turns up to ``--turns``; the
result is each figure's fitted slope (MiB per 1000 turns) and its rise after the warm-up.

    python benchmarks/bench_soak.py [--clients 8] [--warmup 4000] [--turns 12000] [--every 400]

Writes benchmarks/results/soak_cpu.json (``--output``; soak_cpu_no_onednn_cache.json was run
with ONEDNN_PRIMITIVE_CACHE_CAPACITY=0).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))  # the shared workloads

from common import write  # noqa: E402
from soak_workload import SoakBudget, soak, soak_spec  # noqa: E402
from ultrakv.client.local_cluster import LocalCluster  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=4000, help="turns before sampling counts")
    parser.add_argument("--turns", type=int, default=12000, help="turns in all")
    parser.add_argument("--every", type=int, default=400, help="turns between samples")
    parser.add_argument("--output", default="soak_cpu.json")
    args = parser.parse_args()
    budget = SoakBudget()
    with tempfile.TemporaryDirectory() as tmp, \
            LocalCluster(soak_spec(Path(tmp), budget)) as cluster:
        result = asyncio.run(soak(cluster, budget, args.clients, args.warmup, args.turns,
                                  args.every, timeout_s=3600))
    out = result.as_dict()
    print({k: out[k] for k in ("turns", "sessions", "seconds", "failed",
                               "slope_mib_per_1000_turns", "rise_after_warmup_mib")})
    # oneDNN's primitive cache (1024 kernels by default) fills over thousands of turns: most
    # of a node's growth after the warm-up (ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 to compare)
    write(args.output, {"model": "tiny", "device": "cpu", "nodes": 2, "coordinators": 1,
                        "onednn_primitive_cache_capacity":
                            os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "default"), **out})


if __name__ == "__main__":
    main()
