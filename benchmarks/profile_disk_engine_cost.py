"""What the disk tier costs the engine's thread per block, on CPU (llama-1b's 512 KiB blocks).

The engine thread pays for the disk tier twice: directly (handing blocks to the writer,
starting reads) and through the GIL, which the writer thread and the reader threads take
back after every system call and hold for their Python work per block (building paths,
headers, checksums). On a GPU node the engine thread needs the GIL for every kernel launch,
so each of those takes delays the next launch. Measured here, per block:

* ``write_us`` / ``read_us``: a block file written (``DiskTier._write``) and read
  (``DiskTier.read_into``) on the calling thread, its CPU time (system calls included);
* ``gil_write_us`` / ``gil_read_us``: how much longer an engine-like loop (small torch ops:
  dispatcher work under the GIL, as kernel launches are) takes while the writer writes
  ``--blocks`` blocks, or the tier's reader threads read them, than alone, divided by the
  blocks;
* ``submit_us`` / ``start_read_us``: the engine thread's CPU time to hand a block to the
  writer (``DiskTier.submit``) and to start its read (``KVTiers.prefetch``).

Medians of ``--rounds`` rounds; the files sit in the page cache (just written).

    python benchmarks/profile_disk_engine_cost.py [--blocks 64] [--rounds 7] [--label before|after]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import wait
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import machine, write  # noqa: E402
from ultrakv.node.kv.disk_tier import DiskTier  # noqa: E402
from ultrakv.node.kv.tiers import BlockIdentity, KVTiers  # noqa: E402

SHAPE = (16, 2, 16, 8, 64)  # llama-1b: 16 layers, K and V, 16 tokens, 8 KV heads, head_dim 64
DTYPE = torch.bfloat16
ENGINE_OPS = 4000


def _engine_loop() -> float:
    """Seconds for ENGINE_OPS small torch ops (Python and dispatcher work under the GIL)."""
    a, b = torch.ones(16), torch.ones(16)
    t0 = time.perf_counter()
    for _ in range(ENGINE_OPS):
        torch.add(a, b)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--label", default="")
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(1)
    n = args.blocks
    identity = BlockIdentity("profile", "bfloat16", SHAPE[2])
    directory = Path(tempfile.mkdtemp(prefix="ultrakv-disk-cost-"))
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randn(SHAPE, generator=g).to(DTYPE) for _ in range(n)]
    figures: dict[str, list[float]] = {k: [] for k in (
        "write_us", "read_us", "gil_write_us", "gil_read_us", "submit_us", "start_read_us", "engine_loop_ms")}
    try:
        # The calling thread's own cost of a write and a read (no writer thread).
        alone = DiskTier(directory / "alone", identity.namespace, identity.key, SHAPE, DTYPE, 1 << 40)
        alone.close()
        out = torch.empty(alone.block_bytes, dtype=torch.uint8)
        for r in range(args.rounds):
            c0 = time.thread_time()
            for i, block in enumerate(blocks):
                alone._write(r * n + i, block)
            c1 = time.thread_time()
            for i in range(n):
                assert alone.read_into(r * n + i, out)
            c2 = time.thread_time()
            figures["write_us"].append((c1 - c0) / n * 1e6)
            figures["read_us"].append((c2 - c1) / n * 1e6)
        # The writer and the readers beside an engine-like loop.
        caches = list(torch.zeros((SHAPE[0], SHAPE[1], 4, *SHAPE[2:]), dtype=DTYPE).unbind(0))
        disk = DiskTier(directory / "tier", identity.namespace, identity.key, SHAPE, DTYPE, 1 << 40,
                        queue_blocks=n)
        tiers = KVTiers(caches, identity, None, disk)
        tiers.cost.blocks_to_load = len  # every block read (the subject is the read path)
        for r in range(args.rounds):
            idle = statistics.median(_engine_loop() for _ in range(3))
            figures["engine_loop_ms"].append(idle * 1e3)
            hashes = [1_000_000 + r * n + i for i in range(n)]
            c0 = time.thread_time()
            for h, block in zip(hashes, blocks, strict=True):
                assert disk.submit(h, block)
            figures["submit_us"].append((time.thread_time() - c0) / n * 1e6)
            busy = _engine_loop()
            disk.flush()
            figures["gil_write_us"].append(max(0.0, busy - idle) / n * 1e6)
            c0 = time.thread_time()
            assert tiers.prefetch(hashes) == n
            figures["start_read_us"].append((time.thread_time() - c0) / n * 1e6)
            busy = _engine_loop()
            wait(tiers.reads_in_flight(), timeout=60)
            figures["gil_read_us"].append(max(0.0, busy - idle) / n * 1e6)
            assert tiers.plan(hashes) == n
            tiers._drop_reads()  # the staging slots back for the next round
        tiers.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    medians = {k: round(statistics.median(v), 1) for k, v in figures.items()}
    name = args.out or f"disk_engine_cost_cpu{'_' + args.label if args.label else ''}.json"
    write(name, {"host": machine(), "label": args.label,
                 "workload": {"blocks": n, "rounds": args.rounds, "block_bytes": out.numel(), "shape": list(SHAPE),
                              "dtype": "bfloat16", "engine_ops": ENGINE_OPS},
                 "per_block_median": medians, "rounds": {k: [round(x, 1) for x in v] for k, v in figures.items()}})
    print(" ".join(f"{k}={v}" for k, v in medians.items()))


if __name__ == "__main__":
    main()
