"""KV tiers below the GPU block pool: host memory, then a local disk directory.

A block the pool evicts (write-back, the default) or commits (write-through) is copied to
the host tier; a block the host tier evicts goes to the disk tier (write-through: every
block written to the host tier goes to disk too). A prefix match looks GPU → host → disk
(:meth:`KVTiers.available`) and :meth:`KVTiers.load` copies the hit blocks into fresh pool
blocks in one batch: on CUDA from pinned memory on a side stream the compute stream waits
for, on CPU a plain copy. :meth:`KVTiers.prefetch` starts reading a request's disk blocks
when it arrives, so they are in memory by the time it is scheduled.

Keys are the pool's chained block hashes; a :class:`BlockIdentity` (model fingerprint, KV
dtype, block size) names the disk namespace and every file's header, so blocks of another
model or format never mix. Blocks move as ``[layers, 2, block_size, kv_heads, head_dim]``:
all layers of a block contiguous.

Ordering: the pool tells about an eviction while the block's bytes are still in place; the
copies are issued by :meth:`KVTiers.flush`, which the engine calls before anything writes
into the KV caches (a model step, a load, an import). Not thread-safe: the engine calls it
under its lock (the disk tier has its own writer thread and lock).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext as _nothing
from dataclasses import dataclass

import torch
from ultrakv.node.kv.disk_tier import DiskTier
from ultrakv.node.kv.host_tier import HostTier

log = logging.getLogger("ultrakv.node.kv.tiers")

TIERS = ("gpu", "cpu", "disk")
WRITE_POLICIES = ("write_back", "write_through")
# Reads started ahead of scheduling and not consumed yet, at most (each holds one block).
MAX_PREFETCHED = 1024
# How long a stopping engine may spend writing its cached blocks to disk (well inside a pod's
# termination grace period, which the final checkpoint shares).
PERSIST_BUDGET_S = 30.0

# BlockPool.publish: (stored, block hashes, tier "cpu" | "disk"), the pool's observer hook,
# through which the coordinators' prefix index learns which node holds which block.
Publish = Callable[[bool, Sequence[int], str], None]


@dataclass(frozen=True)
class BlockIdentity:
    """What a block hash means: the same token chain under the same model, KV format and
    block size. Part of every tier key, so formats never mix."""

    model_fingerprint: str
    kv_dtype: str
    block_size: int

    @property
    def namespace(self) -> str:
        """A directory name for this identity (readable, and unique by a digest)."""
        digest = hashlib.blake2b(f"{self.model_fingerprint}|{self.kv_dtype}|{self.block_size}"
                                 .encode(), digest_size=6).hexdigest()
        model = re.sub(r"[^A-Za-z0-9_.-]", "_", self.model_fingerprint)[:24]
        return f"{model}-{self.kv_dtype}-bs{self.block_size}-{digest}"

    def key(self, block_hash: int) -> str:
        """The block's full key, written in its file header and checked on read."""
        return f"{self.model_fingerprint}/{self.kv_dtype}/{self.block_size}/{block_hash:016x}"


@dataclass
class TierCounters:
    """Blocks found per tier by prefix matches (GPU hits are the pool's)."""

    cpu_hits: int = 0
    disk_hits: int = 0
    offloaded: int = 0  # blocks copied from the GPU pool to the next tier
    loaded: int = 0  # blocks copied back into the GPU pool
    prefetched: int = 0  # disk reads started when a request arrived, before its scheduling


class KVTiers:
    """The host and disk tiers of one engine's KV caches (either may be absent)."""

    def __init__(self, kv_caches: list[torch.Tensor], identity: BlockIdentity,
                 host: HostTier | None, disk: DiskTier | None, write_through: bool = False,
                 publish: Publish | None = None) -> None:
        self.kv_caches = kv_caches
        self.device = kv_caches[0].device
        self.identity = identity
        self.host = host
        self.disk = disk
        self.write_through = write_through
        self.publish = publish
        # The disk tier's writer thread stores and evicts files; its events are published
        # from the engine's thread (in flush), as the pool's observers expect.
        self._disk_events: deque[tuple[bool, int]] = deque()
        if disk is not None:
            disk.observer = lambda event, h: self._disk_events.append((event == "stored", h))
        self.counters = TierCounters()
        self._pending: dict[int, int] = {}  # block hash -> pool block id, to offload
        self._prefetched: OrderedDict[int, Future[torch.Tensor | None]] = OrderedDict()
        self._reader = (ThreadPoolExecutor(1, thread_name_prefix="ultrakv-kv-prefetch")
                        if disk is not None else None)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @staticmethod
    def block_shape(kv_caches: list[torch.Tensor]) -> tuple[int, ...]:
        """One block's shape across layers: ``[layers, 2, block_size, kv_heads, head_dim]``
        from per-layer caches ``[2, num_blocks, block_size, kv_heads, head_dim]``."""
        c = kv_caches[0]
        return (len(kv_caches), c.shape[0], *c.shape[2:])

    # -- from the pool ----------------------------------------------------------------------

    def on_evict(self, block_id: int, block_hash: int) -> None:
        """The pool is reclaiming ``block_id`` (still intact until the next :meth:`flush`)."""
        if self.host is None and not self.disk.enabled:
            return  # the only tier below is off: nothing to copy
        if self.host is not None and block_hash in self.host:
            self.host.touch(block_hash)
        elif self.host is None and self.disk is not None and block_hash in self.disk:
            pass
        else:
            self._pending[block_hash] = block_id

    def on_commit(self, block_id: int, block_hash: int) -> None:
        """The pool registered a full block (offloaded now under write-through only)."""
        if self.write_through and not (self.host is not None and block_hash in self.host):
            self._pending[block_hash] = block_id

    # -- offload ----------------------------------------------------------------------------

    def flush(self) -> None:
        """Copy every block the pool let go of (or committed, write-through) to the next
        tier. Must run before anything writes into the KV caches."""
        while self._disk_events:
            stored, h = self._disk_events.popleft()
            self._emit(stored, h, "disk")
        if not self._pending:
            return
        hashes = list(self._pending)
        ids = torch.tensor(list(self._pending.values()), device=self.device)
        self._pending.clear()
        gathered = self._gather(ids)
        self.counters.offloaded += len(hashes)
        if self.host is None:
            cpu = gathered.cpu()
            for i, h in enumerate(hashes):
                self.disk.submit(h, cpu[i].clone())
            return
        # One block at a time: the host tier may evict a block of this very batch to make
        # room, and that block's bytes must be read before its slot is written again.
        index = {h: i for i, h in enumerate(hashes)}
        slots = []
        if self._stream is not None:  # the copies wait for the gather on the compute stream
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream) if self._stream is not None else _nothing():
            for i, h in enumerate(hashes):
                slot, victim = self.host.reserve(h)
                if victim is not None:
                    old, old_slot = victim
                    if self._spills_to_disk(old):
                        j = index.get(old, i)
                        self._spill(old, gathered[j].cpu() if j < i else self.host.slot(old_slot).clone())
                    else:  # nothing to write: no copy (a clone of a pinned slot waits for its copy)
                        self._emit(False, old, "cpu")
                self.host.data[slot].copy_(gathered[i], non_blocking=self._stream is not None)
                slots.append(slot)
                self._emit(True, h, "cpu")
            if self._stream is not None:
                event = torch.cuda.Event()
                event.record(self._stream)
                gathered.record_stream(self._stream)
                self.host.mark_pending(slots, event)
        if self.write_through and self.disk is not None:
            for h in hashes:
                slot = self.host.lookup(h)
                if slot is not None:
                    self.disk.submit(h, self.host.slot(slot).clone())

    def _gather(self, ids: torch.Tensor) -> torch.Tensor:
        """Blocks ``ids`` of every layer as ``[n, layers, 2, block_size, heads, dim]``."""
        # As bytes: CPU has no index_select for an fp8 (kv_cache_dtype fp8_e4m3) cache.
        stacked = torch.stack([c.view(torch.uint8).index_select(1, ids) for c in self.kv_caches])
        return stacked.permute(2, 0, 1, 3, 4, 5).contiguous().view(self.kv_caches[0].dtype)

    def _spills_to_disk(self, block_hash: int) -> bool:
        """Whether a block the host tier evicts must be written to disk: write-back with a
        disk tier that lacks it (write-through already wrote it)."""
        return self.disk is not None and not self.write_through and block_hash not in self.disk

    def _spill(self, block_hash: int, block: torch.Tensor) -> None:
        """The host tier evicted ``block_hash`` (its bytes: ``block``): write-back sends it to
        disk (write-through already did)."""
        self._emit(False, block_hash, "cpu")
        if self._spills_to_disk(block_hash):
            self.disk.submit(block_hash, block)

    # -- lookup and load --------------------------------------------------------------------

    def available(self, hashes: list[int]) -> int:
        """How many leading ``hashes`` the host or disk tier holds (nothing is touched)."""
        n = 0
        for h in hashes:
            if not ((self.host is not None and h in self.host) or h in self._prefetched
                    or (self.disk is not None and h in self.disk)):
                break
            n += 1
        return n

    def prefetch(self, hashes: list[int]) -> int:
        """Start reading the disk blocks of the leading run of ``hashes`` the tiers hold;
        returns how many reads started."""
        if self._reader is None:
            return 0
        started = 0
        for h in hashes:
            if self.host is not None and h in self.host or h in self._prefetched:
                continue
            if h not in self.disk:
                break
            if len(self._prefetched) >= MAX_PREFETCHED:
                self._prefetched.popitem(last=False)
            self._prefetched[h] = self._reader.submit(self.disk.read, h)
            started += 1
        self.counters.prefetched += started
        return started

    def load(self, hashes: list[int], block_ids: list[int]) -> int:
        """Copy the blocks of the leading run of ``hashes`` found in the tiers into pool
        blocks ``block_ids`` (one per hash); returns how many were loaded (a block missing or
        failing its check ends the run: the rest is recomputed)."""
        self.flush()  # the blocks being filled may have just been evicted
        blocks: list[torch.Tensor] = []
        for h in hashes[: len(block_ids)]:
            block = self._fetch(h)
            if block is None:
                break
            blocks.append(block)
        if not blocks:
            return 0
        n = len(blocks)
        ids = torch.tensor(block_ids[:n], device=self.device)
        if self._stream is None:
            staged = torch.stack(blocks)
        else:
            staged = torch.empty((n, *blocks[0].shape), dtype=blocks[0].dtype, device=self.device)
            main = torch.cuda.current_stream(self.device)
            self._stream.wait_stream(main)
            with torch.cuda.stream(self._stream):
                for i, block in enumerate(blocks):  # pinned host slots: asynchronous DMA
                    staged[i].copy_(block, non_blocking=True)
            main.wait_stream(self._stream)
            staged.record_stream(self._stream)
        for layer, cache in enumerate(self.kv_caches):
            cache.view(torch.uint8).index_copy_(1, ids, staged[:, layer].transpose(0, 1).view(torch.uint8))
        self.counters.loaded += n
        return n

    def peek(self, hashes: list[int]) -> list[torch.Tensor]:
        """CPU copies of the blocks of the leading run of ``hashes`` the tiers hold, without
        loading them into the pool or counting hits (a session's export: migration,
        checkpoints, backups)."""
        self.flush()  # a block evicted a moment ago is in the host tier after this
        blocks: list[torch.Tensor] = []
        for h in hashes:
            slot = self.host.lookup(h) if self.host is not None else None
            block = (self.host.slot(slot).clone() if slot is not None
                     else self.disk.read(h) if self.disk is not None else None)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def _fetch(self, h: int) -> torch.Tensor | None:
        if self.host is not None:
            slot = self.host.lookup(h)
            if slot is not None:
                self.counters.cpu_hits += 1
                self._prefetched.pop(h, None)
                return self.host.slot(slot)
        future = self._prefetched.pop(h, None)
        block = future.result() if future is not None else (
            self.disk.read(h) if self.disk is not None else None)
        if block is not None:
            self.counters.disk_hits += 1
        return block

    # -- lifecycle --------------------------------------------------------------------------

    def persist(self, gpu_blocks: list[tuple[int, int]], budget_s: float = PERSIST_BUDGET_S) -> int:
        """Write blocks not on disk yet to it, blocking, for at most ``budget_s`` (a node
        stopping has a grace period to keep): the host tier's first, then the GPU pool's
        ``(hash, block id)``; returns how many were written. Under write-back this is what
        makes a stopped node's cache outlive it."""
        if self.disk is None or not self.disk.enabled:
            return 0
        deadline = time.monotonic() + budget_s
        self.flush()
        self.disk.flush()
        todo: list[tuple[int, int | None]] = []
        if self.host is not None:
            todo += [(h, None) for h in self.host.hashes()]
        todo += [(h, b) for h, b in gpu_blocks]
        todo = [(h, b) for h, b in todo if h not in self.disk]
        written = 0
        for start in range(0, len(todo), 64):
            if time.monotonic() > deadline:
                log.warning("KV tiers: %d blocks not written to disk at shutdown (over the "
                            "%.0f s budget)", len(todo) - start, budget_s)
                break
            chunk = todo[start : start + 64]
            gpu = [b for _, b in chunk if b is not None]
            from_gpu = iter(self._gather(torch.tensor(gpu, device=self.device)).cpu()) if gpu else iter(())
            for h, b in chunk:
                block = next(from_gpu) if b is not None else self.host.slot(self.host.lookup(h))
                written += self.disk.write_now(h, block)
        return written

    def clear(self) -> int:
        """Drop every block of both tiers (disk files included); returns how many."""
        self._pending.clear()
        self._prefetched.clear()
        n = 0
        if self.host is not None:
            for h in self.host.hashes():
                self._emit(False, h, "cpu")
            n += self.host.clear()
        if self.disk is not None:
            n += self.disk.clear()
        return n

    def close(self) -> None:
        """Stop the prefetch reader and the disk writer (queued writes finish first)."""
        if self._reader is not None:
            self._reader.shutdown(wait=True, cancel_futures=True)
        if self.disk is not None:
            self.disk.close()

    def stats(self) -> dict:
        """Per-tier counters for ``Engine.stats()['kv_tiers']``."""
        c = self.counters
        out: dict = {"offloaded": c.offloaded, "loaded": c.loaded, "prefetched": c.prefetched,
                     "write_policy": "write_through" if self.write_through else "write_back"}
        if self.host is not None:
            out["cpu"] = {"hits": c.cpu_hits, "blocks": len(self.host),
                          "capacity": self.host.capacity, "evictions": self.host.evictions,
                          "pinned": self.host.pinned}
        if self.disk is not None:
            d = self.disk
            out["disk"] = {"hits": c.disk_hits, "blocks": len(d), "capacity": d.capacity,
                           "evictions": d.evictions, "writes": d.writes, "dropped": d.dropped,
                           "corrupted": d.corrupted, "enabled": d.enabled,
                           "directory": str(d.directory)}
        return out

    def _emit(self, stored: bool, block_hash: int, tier: str) -> None:
        if self.publish is not None:
            self.publish(stored, (block_hash,), tier)
