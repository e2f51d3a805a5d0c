"""The engine-thread cost of offloading evicted blocks (``KVTiers.flush``), without a model.

An engine with llama-1b's KV block shape (profile_tier_overhead.py's preset: 16 layers, 8 KV
heads, head_dim 64; fp32 on CPU, 1 MiB per block) gets a CPU tier, with and without a disk
tier below it. The CPU tier is filled first, so every later flush evicts as many blocks from
it as it stores: with a disk tier those spill to disk, and the disk writer runs meanwhile.
Each round marks ``--batch`` pool blocks evicted (a 512-token turn evicts 32) and times the
flush: wall time and the engine thread's CPU time (the latter robust to a loaded machine).

    python benchmarks/profile_tier_flush.py [--rounds 40] [--batch 32] [--label before|after]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import machine, write  # noqa: E402
from profile_tier_overhead import PRESET  # noqa: E402  (registers the preset)
from ultrakv.node import Engine, EngineConfig  # noqa: E402


def _flushes(engine: Engine, rounds: int, batch: int, first_hash: int) -> tuple[list[float], list[float]]:
    wall, cpu = [], []
    h = first_hash
    for _ in range(rounds):
        for block in range(batch):
            engine.tiers.on_evict(block, h)
            h += 1
        t0, c0 = time.perf_counter(), time.thread_time()
        engine.tiers.flush()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    return wall, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--cpu-blocks", type=int, default=256)
    p.add_argument("--label", default="")
    p.add_argument("--out")
    args = p.parse_args()
    results: dict = {}
    disk_dir = Path(tempfile.mkdtemp(prefix="ultrakv-tier-flush-"))
    try:
        for label, disk in (("cpu", False), ("cpu_disk", True)):
            probe = Engine(EngineConfig(model=PRESET, device="cpu", num_blocks=args.batch + 1, block_size=16))
            gib = args.cpu_blocks * probe._bytes_per_block() / 2**30
            probe.shutdown()
            kw = {"kv_disk_dir": str(disk_dir / label)} if disk else {}
            engine = Engine(EngineConfig(model=PRESET, device="cpu", num_blocks=args.batch + 1, block_size=16,
                                         kv_cpu_gib=gib, **kw))
            try:
                _flushes(engine, args.cpu_blocks // args.batch + 1, args.batch, 1 << 40)  # fill the CPU tier
                wall, cpu = _flushes(engine, args.rounds, args.batch, 1 << 41)
                stats = engine.stats()["kv_tiers"]
            finally:
                engine.shutdown()
            results[label] = {
                "flush_ms_per_block": {"wall_median": statistics.median(wall) / args.batch * 1e3,
                                       "cpu_median": statistics.median(cpu) / args.batch * 1e3,
                                       "wall_max": max(wall) / args.batch * 1e3},
                "cpu_evictions": stats["cpu"]["evictions"],
                **({"disk_writes": stats["disk"]["writes"], "disk_dropped": stats["disk"]["dropped"]}
                   if disk else {})}
    finally:
        shutil.rmtree(disk_dir, ignore_errors=True)
    write(args.out or f"tier_flush_cpu{'_' + args.label if args.label else ''}.json",
          {"host": machine(), "label": args.label, "model": PRESET,
           "workload": {"rounds": args.rounds, "batch": args.batch, "cpu_blocks": args.cpu_blocks},
           "results": results})
    for label, r in results.items():
        f = r["flush_ms_per_block"]
        print(f"{label:10s} flush per block: wall {f['wall_median']:.3f} ms, cpu {f['cpu_median']:.3f} ms "
              f"(max wall {f['wall_max']:.3f}) {r}")


if __name__ == "__main__":
    main()
