"""The engine-thread cost per block of the KV tiers' offload (``KVTiers.flush``) and load
(``KVTiers.plan`` + ``KVTiers.load``), without a model step.

An engine gets a CPU tier, with and without a disk tier below it. The CPU tier is filled
first, so every later flush evicts as many blocks from it as it stores: with a disk tier
those spill to disk, and the disk writer runs meanwhile. Each round marks ``--batch`` pool
blocks evicted (a 512-token turn evicts 32) and times the flush; then ``--batch`` blocks the
CPU tier holds are planned and loaded back into the pool, timed the same way. On CUDA's path
a flush only snapshots the blocks and the rest (``KVTiers.settle``) runs while the model step
computes: its CPU time is reported apart (``settle_cpu_median``). Wall time and
the engine thread's CPU time are reported (the latter robust to a loaded machine).

Two block shapes tell the copy from the bookkeeping: ``1b`` is llama-1b's KV block (16
layers, 8 KV heads, head_dim 64; fp32 on CPU, 1 MiB per block: copies dominate), ``small``
a 1 KiB block (1 layer, 1 KV head, head_dim 16, 8 tokens): what is left is the Python per
block, which a GPU pays too (there the copies are asynchronous).

``--device cuda`` times the same on a GPU, where the copies are asynchronous: what is timed is
the engine thread's own work (the device is synchronized between rounds, outside the timing).
``--batched`` runs the copy path CUDA takes (one gather, copies by runs of slots, one
index_copy_ per layer) on CPU, minus its streams: with ``--shape small`` that is the Python a
GPU's engine thread pays per block.

    python benchmarks/profile_tier_flush.py [--device cpu|cuda] [--shape 1b|small] [--batched]
        [--rounds 40] [--batch 32] [--label L]
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

import torch  # noqa: E402
from common import machine, write  # noqa: E402
from profile_tier_overhead import PRESET  # noqa: E402  (registers the preset)
from ultrakv.node import Engine, EngineConfig  # noqa: E402
from ultrakv.node.model import presets  # noqa: E402
from ultrakv.node.model.config import ModelConfig  # noqa: E402

SMALL = "kv-shape-small"
presets.PRESETS[SMALL] = ModelConfig(
    architecture="llama", vocab_size=320, hidden_size=16, intermediate_size=32,
    num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=16,
    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=10000.0,
    torch_dtype="float32", bos_token_id=256, eos_token_ids=[257])
SHAPES = {"1b": (PRESET, 16), "small": (SMALL, 8)}  # preset, block size


def _timed(fn, *args) -> tuple[float, float, object]:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()  # the rounds before are done: only this call's host work is timed
    t0, c0 = time.perf_counter(), time.thread_time()
    out = fn(*args)
    return time.perf_counter() - t0, time.thread_time() - c0, out


def _flushes(engine: Engine, rounds: int, batch: int, first_hash: int
             ) -> tuple[list[float], list[float], list[float]]:
    """Per round: the flush's wall and CPU time (before the step: the critical path), and
    the CPU time of its settle (CUDA's path stores the flush while the step computes)."""
    wall, cpu, settle = [], [], []
    h = first_hash
    for _ in range(rounds):
        for block in range(batch):
            engine.tiers.on_evict(block, h)
            h += 1
        w, c, _ = _timed(engine.tiers.flush)
        wall.append(w)
        cpu.append(c)
        stored = getattr(engine.tiers, "settle", None)  # absent before the deferred store
        settle.append(_timed(stored)[1] if stored is not None else 0.0)
    return wall, cpu, settle


def _loads(engine: Engine, rounds: int, batch: int) -> tuple[list[float], list[float], int]:
    """Load ``batch`` blocks the CPU tier holds into pool blocks ``0..batch-1``, ``rounds``
    times (the newest blocks first: none of them is evicted by the loads' own flushes)."""
    held = engine.tiers.host.hashes()
    wall, cpu, loaded = [], [], 0
    for r in range(rounds):
        hashes = held[len(held) - (r % (len(held) // batch) + 1) * batch:][:batch]
        w1, c1, n = _timed(engine.tiers.plan, hashes)
        w2, c2, got = _timed(engine.tiers.load, hashes[:n], list(range(n)))
        wall.append(w1 + w2)
        cpu.append(c1 + c2)
        loaded += got
    return wall, cpu, loaded


def _per_block(xs: list[float], batch: int) -> float:
    return round(statistics.median(xs) / batch * 1e6, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--cpu-blocks", type=int, default=256)
    p.add_argument("--batched", action="store_true", help="CUDA's copy path, run on CPU")
    p.add_argument("--label", default="")
    p.add_argument("--out")
    args = p.parse_args()
    preset, block_size = SHAPES[args.shape]
    results: dict = {}
    disk_dir = Path(tempfile.mkdtemp(prefix="ultrakv-tier-flush-"))
    try:
        for label, disk in (("cpu", False), ("cpu_disk", True)):
            common = dict(model=preset, device=args.device, num_blocks=args.batch + 1, block_size=block_size)
            probe = Engine(EngineConfig(**common))
            gib = args.cpu_blocks * probe._bytes_per_block() / 2**30
            probe.shutdown()
            kw = {"kv_disk_dir": str(disk_dir / label)} if disk else {}
            engine = Engine(EngineConfig(**common, kv_cpu_gib=gib, **kw))
            if args.batched:  # what KVTiers(batched=True) does; the engine builds its own tiers
                engine.tiers._batched = True
            try:
                _flushes(engine, args.cpu_blocks // args.batch + 1, args.batch, 1 << 40)  # fill the CPU tier
                wall, cpu, settle = _flushes(engine, args.rounds, args.batch, 1 << 41)
                if engine.tiers.disk is not None:
                    engine.tiers.disk.flush()
                lwall, lcpu, loaded = _loads(engine, args.rounds, args.batch)
                stats = engine.stats()["kv_tiers"]
            finally:
                engine.shutdown()
            results[label] = {
                "offload_us_per_block": {"wall_median": _per_block(wall, args.batch),
                                         "cpu_median": _per_block(cpu, args.batch),
                                         "wall_max": round(max(wall) / args.batch * 1e6, 2),
                                         "settle_cpu_median": _per_block(settle, args.batch)},
                "load_us_per_block": {"wall_median": _per_block(lwall, args.batch),
                                      "cpu_median": _per_block(lcpu, args.batch),
                                      "wall_max": round(max(lwall) / args.batch * 1e6, 2)},
                "loaded": loaded, "cpu_evictions": stats["cpu"]["evictions"],
                **({"disk_writes": stats["disk"]["writes"], "disk_dropped": stats["disk"]["dropped"]}
                   if disk else {})}
    finally:
        shutil.rmtree(disk_dir, ignore_errors=True)
    name = f"{args.shape}{'_batched' if args.batched else ''}{'_' + args.label if args.label else ''}"
    write(args.out or f"tier_flush_{args.device}_{name}.json",
          {"host": machine(), "label": args.label, "model": preset, "block_bytes_shape": args.shape,
           "workload": {"device": args.device, "rounds": args.rounds, "batch": args.batch,
                        "cpu_blocks": args.cpu_blocks,
                        "batched": args.batched},
           "results": results})
    for label, r in results.items():
        f, g = r["offload_us_per_block"], r["load_us_per_block"]
        print(f"{args.device} {args.shape:5s} {label:9s} per block (us, median wall/cpu): "
              f"offload {f['wall_median']:.1f}/{f['cpu_median']:.1f} (+{f['settle_cpu_median']:.1f} during the "
              f"step), load {g['wall_median']:.1f}/{g['cpu_median']:.1f} "
              f"(loaded {r['loaded']}, cpu evictions {r['cpu_evictions']})")


if __name__ == "__main__":
    main()
