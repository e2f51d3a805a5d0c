"""Where a disk-tier load spends its time, per block (default: llama-1b's 512 KiB blocks).

Writes ``--blocks`` block files through a real :class:`DiskTier`, then times, per block:

* the pieces, on the same files: open + read into a new ``bytes`` (``read_bytes``), open +
  ``preadv`` into a preallocated buffer, sha256 / zlib crc32 / xxh3-64 of the block's bytes,
  the copies a load made before (``bytearray`` + ``torch.frombuffer``, then ``torch.stack``);
* the whole paths: ``DiskTier.read`` (one block back as a tensor) and ``KVTiers.plan`` +
  ``KVTiers.load`` of every block into a pool on ``--device`` (cpu: the CPU device standing
  in for the GPU; cuda: through the pinned staging buffer), cold (nothing prefetched: the
  load reads the files) and after ``prefetch`` (the reads done in the background when the
  request arrived).

The files sit in the page cache (just written), as they do on a node whose host memory
holds its disk tier's working set; a cold disk adds its own read time on top.

    python benchmarks/profile_disk_tier.py [--device cpu|cuda] [--blocks 256] [--block-kib 512] [--out NAME]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
import zlib
from concurrent.futures import wait
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import machine, write  # noqa: E402
from ultrakv.node.kv.disk_tier import DiskTier  # noqa: E402
from ultrakv.node.kv.tiers import BlockIdentity, KVTiers  # noqa: E402


def _per_block_us(fn, items: list, repeat: int = 3) -> float:
    """Best of ``repeat`` passes over ``items``, in microseconds per item."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for x in items:
            fn(x)
        best = min(best, (time.perf_counter() - t0) / len(items))
    return best * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--blocks", type=int, default=256)
    p.add_argument("--block-kib", type=int, default=512, help="512: llama-1b, 16-token blocks")
    p.add_argument("--label", default="", help="a name for this code state (before / after)")
    p.add_argument("--out", help="result file name under benchmarks/results/")
    args = p.parse_args()

    # llama-1b's block: 16 layers x K,V x 16 tokens x 8 heads x 64 dims in bf16 = 512 KiB.
    layers, heads, dim, bs = 16, 8, 64, 16
    layers = max(1, args.block_kib * 1024 // (2 * bs * heads * dim * 2))
    caches = [torch.randn((2, args.blocks, bs, heads, dim)).to(torch.bfloat16).to(args.device)
              for _ in range(layers)]
    shape = KVTiers.block_shape(caches)
    block_bytes = caches[0].element_size() * caches[0][:, 0].numel() * layers
    identity = BlockIdentity("profile", "bfloat16", bs)
    hashes = [1000 + i for i in range(args.blocks)]
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="ultrakv-profile-disk-") as d:
        disk = DiskTier(d, identity.namespace, identity.key, shape, torch.bfloat16, 1 << 40,
                        queue_blocks=args.blocks)
        tiers = KVTiers(caches, identity, None, disk)
        for i, h in enumerate(hashes):
            tiers.on_evict(i, h)
        t0 = time.perf_counter()
        tiers.flush()
        disk.flush()
        figures["write_us"] = (time.perf_counter() - t0) / args.blocks * 1e6
        paths = [disk.directory / f"{h:016x}.kvb" for h in hashes]
        payloads = [Path(p).read_bytes() for p in paths]
        buf = bytearray(len(payloads[0]))

        def preadv(path: Path) -> None:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.preadv(fd, [buf], 0)
            finally:
                os.close(fd)

        pieces = {
            "read_bytes": lambda path: path.read_bytes(),
            "open_preadv_into_buffer": preadv,
        }
        for name, fn in pieces.items():
            figures[f"{name}_us"] = _per_block_us(fn, paths)
        digests = {"sha256": lambda b: hashlib.sha256(b).digest(), "zlib_crc32": zlib.crc32}
        try:
            import xxhash

            digests["xxh3_64"] = xxhash.xxh3_64_intdigest
        except ImportError:
            pass
        for name, fn in digests.items():
            us = _per_block_us(fn, payloads)
            figures[f"{name}_us"] = us
            figures[f"{name}_MBps"] = len(payloads[0]) / us
        figures["bytearray_frombuffer_us"] = _per_block_us(
            lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8), payloads)
        blocks = [torch.frombuffer(bytearray(b[:block_bytes]), dtype=torch.uint8) for b in payloads]
        t0 = time.perf_counter()
        torch.stack(blocks)
        figures["stack_us"] = (time.perf_counter() - t0) / args.blocks * 1e6
        figures["disk_read_us"] = _per_block_us(disk.read, hashes)

        ids = list(range(args.blocks))

        def load(prefetch: bool) -> float:
            best = float("inf")
            for _ in range(3):
                if prefetch:  # the reads done in the background, before the request's turn
                    tiers.prefetch(hashes)
                    wait(tiers.reads_in_flight())
                t0 = time.perf_counter()
                while tiers.plan(hashes) is None:  # the reads this load needs
                    wait(tiers.reads_in_flight(), return_when="FIRST_COMPLETED")
                n = tiers.load(hashes, ids)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                best = min(best, (time.perf_counter() - t0) / n)
                assert n == args.blocks, n
            return best * 1e6

        figures["load_cold_us"] = load(False)
        figures["load_prefetched_us"] = load(True)
        figures["load_cold_MBps"] = block_bytes / figures["load_cold_us"]
        tiers.close()
    write(args.out or f"profile_disk_tier_{args.device}{'_' + args.label if args.label else ''}.json",
          {"host": machine(), "label": args.label,
           "workload": {"blocks": args.blocks, "block_bytes": block_bytes, "shape": list(shape),
                        "device": args.device},
           "per_block": figures})
    for k, v in figures.items():
        print(f"{k:28s} {v:10.1f}")


if __name__ == "__main__":
    main()
