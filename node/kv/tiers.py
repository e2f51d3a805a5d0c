"""KV tiers below the GPU block pool: host memory, then a local disk directory.

A block the pool evicts (write-back, the default) or commits (write-through) is copied to
the host tier; a block the host tier evicts goes to the disk tier (write-through: every
block written to the host tier goes to disk too). A prefix match looks GPU → host → disk.

Loading back is two steps, so a disk read never stalls the engine: :meth:`KVTiers.plan`
decides how many of the leading hit blocks to load (node/kv/tier_cost.py: only while
loading them is estimated faster than recomputing them) and starts reading the disk blocks
among them, on reader threads, each straight into a slot of a staging buffer (pinned on
CUDA); while reads are in flight it answers None and the scheduler lets the request wait
while the engine runs the others. Once every block is in host memory, :meth:`KVTiers.load`
copies them into fresh pool blocks in one batch: on CUDA, runs of adjacent slots in one
asynchronous copy each, on a side stream the compute stream waits for; on CPU a plain copy.
:meth:`KVTiers.prefetch` starts the reads when a request arrives, before it is scheduled.

Layer-wise loads (``layerwise``, EngineConfig.kv_tier_layerwise; for a load whose step runs
eagerly, ``load(..., overlap=True)``): the copies go group of layers by group
(``LAYER_GROUPS``), each group's with its own event, and a group enters the pool only when
the forward is about to run its first layer (:meth:`KVTiers.layer_ready`, which the model's
layer loop calls): the compute stream then waits for that group's copies alone, so the
request's own prefill computes the first layers while the later ones are still crossing the
bus. What is not in the pool by the end of the step's forward is put there by
:meth:`KVTiers.layers_ready` (the engine calls it after every step, and before anything else
reads or writes those blocks), so nothing pending outlives a step. See docs/kv-tiers.md for
where it applies (eager steps) and where not (CUDA graph replays).

Keys are the pool's chained block hashes; a :class:`BlockIdentity` (model fingerprint, KV
dtype, block size) names the disk namespace and every file's header, so blocks of another
model or format never mix. Blocks move as ``[layers, 2, block_size, kv_heads, head_dim]``:
all layers of a block contiguous.

Ordering: the pool tells about an eviction while the block's bytes are still in place; the
copies are issued by :meth:`KVTiers.flush`, which the engine calls before anything writes
into the KV caches (a model step, a load, an import). Not thread-safe: the engine calls it
under its lock (the disk tier has its own writer thread and lock; reads run on the reader
threads into staging slots no one else touches until they are done).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass

import torch
from ultrakv.node.kv.disk_tier import DiskTier
from ultrakv.node.kv.host_tier import HostTier
from ultrakv.node.kv.tier_cost import TierCostModel

log = logging.getLogger("ultrakv.node.kv.tiers")

TIERS = ("gpu", "cpu", "disk")
WRITE_POLICIES = ("write_back", "write_through")
# Disk reads land in a staging buffer of this many blocks, at most STAGING_BYTES (pinned on
# CUDA: allocated once, at start); reads started ahead of scheduling hold their slot until a
# load consumes them or a newer read needs it.
STAGING_BLOCKS = 1024
STAGING_BYTES = 256 << 20
# Disk reads run on this many threads (os.preadv and the checksum release the GIL).
READERS = min(4, os.cpu_count() or 1)
# While disk loads are judged slower than recomputing, prefetch still reads this many blocks
# at most once in this many seconds, to keep measuring the disk (see KVTiers.prefetch).
PROBE_BLOCKS = 4
PROBE_S = 2.0
# While disk loads are judged slower than recomputing, blocks the host tier evicts (or the
# pool, with no host tier) go on to disk at most this many per PROBE_S (enough for those
# probes), not all of them: on the
# H100 with llama-1b a disk block loaded in 0.46-0.55 ms against 0.08-0.12 ms to recompute
# it, so the cost model loaded almost none, yet writing every evicted block (the writer's
# queue full, 978 dropped) took the GIL from the engine thread, halving its prefill rate and
# adding 2-3 ms to the turns' TTFT p50. A stopping engine still writes its cache
# (KVTiers.persist), so a restart finds it where the disk pays.
TRICKLE_BLOCKS = PROBE_BLOCKS
# KVTiers.calibrate: loads of this many blocks from host memory, this many times (the first
# rounds pay one-off costs: allocations, first launches; the last is the measurement).
CALIBRATION_BLOCKS = 16
CALIBRATION_ROUNDS = 3
# A finished read that a plan chose to load keeps its slot this long after the latest plan
# that wanted it (a waiting request plans again every step); after that, or if it was only
# prefetched, a newer read may take the slot.
HOLD_S = 1.0
# Where a loaded block comes from (KVTiers.load): a host-tier slot or a disk read's staging slot.
HOST, STAGING = 0, 1
# Layer-wise loads go in this many groups of layers at most (a divisor of the layer count):
# each group costs one copy per block (a block's layers of a group are contiguous in its
# host slot, not across blocks), so finer groups would launch more copies than they hide.
LAYER_GROUPS = 4
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
    skipped: int = 0  # hit blocks recomputed instead: loading them was estimated slower
    unwritten: int = 0  # evicted blocks not written to disk: disk loads did not pay (TRICKLE_BLOCKS)


@dataclass
class _Snapshot:
    """A flush's blocks on CUDA's path, gathered (rows in ``hashes`` order) and not stored
    yet: on CUDA ``done`` marks the gather's end on the compute stream."""

    hashes: list[int]
    gathered: torch.Tensor
    done: torch.cuda.Event | None


@dataclass
class _LayerLoad:
    """A load's blocks on their way into the pool, group of layers by group (layer-wise
    loads): ``staged`` row k (flat block bytes, on the device) goes into pool block ``ids[k]``;
    group g's bytes are in ``staged`` once ``events[g]`` has completed (None: already, on
    CPU); the groups before ``next_group`` are in the pool."""

    ids: torch.Tensor
    staged: torch.Tensor
    events: list[torch.cuda.Event | None]
    next_group: int = 0


@dataclass
class _Read:
    """A disk block being read (or read) into staging slot ``slot``; the future answers
    whether the block checked out, and when the read ended."""

    slot: int
    future: Future[tuple[bool, float]]
    held_until: float = 0.0

    def ok(self) -> bool:
        return self.future.done() and self.future.result()[0]


class KVTiers:
    """The host and disk tiers of one engine's KV caches (either may be absent)."""

    def __init__(self, kv_caches: list[torch.Tensor], identity: BlockIdentity,
                 host: HostTier | None, disk: DiskTier | None, write_through: bool = False,
                 publish: Publish | None = None, batched: bool | None = None,
                 layerwise: bool = False) -> None:
        self.kv_caches = kv_caches
        # All layers as one tensor when they lie back to back in one allocation (the
        # engine's pool does): a gather or scatter of n blocks is then one kernel, not one
        # per layer, which on a GPU is most of an offload's cost on the engine thread.
        self._stacked = stacked_kv(kv_caches)
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
        shape = self.block_shape(kv_caches)
        self.block_bytes = kv_caches[0].element_size()
        for d in shape:
            self.block_bytes *= d
        self.cost = TierCostModel(self.block_bytes, identity.block_size)
        self._pending: dict[int, int] = {}  # block hash -> pool block id, to offload
        self._unsettled: _Snapshot | None = None  # a flush's blocks not stored yet (settle)
        self._next_probe = 0.0  # time.monotonic() of the next disk probe (see prefetch)
        self._trickle_until, self._trickle_left = 0.0, 0  # see TRICKLE_BLOCKS
        self._next_memory_probe = 0.0  # and of the next load from host memory (see plan)
        # On CUDA, copies to host memory (offload) and back (load) each have a stream, so a
        # load never queues behind the offload of the blocks its own allocation evicted (PCIe
        # carries both directions at once).
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._load_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # The batched copy path (one gather, copies by runs of slots, index_copy_ into the
        # pool) is CUDA's; CPU copies block by block, several times faster there. ``batched``
        # True runs CUDA's path on CPU too (minus streams and events): tests cover it so.
        self._batched = self._stream is not None if batched is None else batched
        # Layer-wise loads need the batched path and the layers stacked in one allocation
        # (each group's scatter is then one index_copy_ over a slice of the stack).
        self.layerwise = layerwise and self._batched and self._stacked is not None
        layers = len(kv_caches)
        self._groups = math.gcd(layers, LAYER_GROUPS)
        self._group_layers = layers // self._groups
        self._layer_loads: list[_LayerLoad] = []  # loads whose groups are not all in the pool
        self._layer_blocks: set[int] = set()  # the pool blocks they fill
        # The hook runs on the engine's step thread without the engine's lock, and an export
        # (Engine._read_kv) may ready the same loads from another thread meanwhile.
        self._layer_lock = threading.Lock()
        # Disk reads: block hash -> its read, oldest first; staging slots free or being
        # released (on CUDA, once the copy out of them, ending at the event, is done).
        self._reads: OrderedDict[int, _Read] = OrderedDict()
        # Reads started together (by one prefetch or plan) and not all done: when they are,
        # their bytes over their span is the disk's bandwidth for the cost model.
        self._batches: list[tuple[float, list[Future[tuple[bool, float]]]]] = []
        self._unsubmitted: list[tuple[int, int, Future[tuple[bool, float]]]] = []  # see _submit_reads
        self._reader: ThreadPoolExecutor | None = None
        self._staging = torch.empty(0, dtype=torch.uint8)
        if disk is not None:
            slots = max(1, min(STAGING_BLOCKS, STAGING_BYTES // self.block_bytes))
            self._staging = torch.empty((slots, self.block_bytes), dtype=torch.uint8,
                                        pin_memory=self._stream is not None)
            self._reader = ThreadPoolExecutor(READERS, thread_name_prefix="ultrakv-kv-read")
        self._free_slots = list(range(len(self._staging) - 1, -1, -1))
        self._releasing: deque[tuple[torch.cuda.Event, list[int]]] = deque()
        # CUDA copies into the pool, timed by events once they are done: (start, end, bytes).
        self._timings: deque[tuple[torch.cuda.Event, torch.cuda.Event, int]] = deque()

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
        tier. Must run before anything writes into the KV caches.

        Per step, not per block. On CUDA, flush only snapshots the blocks: one gather on the
        compute stream, after which the pool may overwrite them; the rest (:meth:`settle`:
        host slots for the batch, copies, events, block events) is the engine's to run while
        the model step computes on the device, off the request's critical path, and every
        other method here settles first. Settling reserves the batch's slots in one call,
        copies the blocks on the offload stream in slot order, adjacent slots in one copy,
        with one event the slots carry until it completes (whoever reads a slot waits for it
        then: a load on its own stream, the disk writer on its thread; the engine never
        does). On CPU each block goes straight from the caches into its slot, now (no gather
        buffer: a fresh one costs page faults). Blocks bound for disk are handed to its
        writer thread as they lie in host memory; a block the host tier evicts to make room
        is written to disk from its own slot, which a spare slot stands in for meanwhile
        (node/kv/host_tier.py)."""
        self.settle()
        if self._layer_blocks and not self._layer_blocks.isdisjoint(self._pending.values()):
            # A block still on its way in layer-wise (loaded for a request that then could
            # not be scheduled, and evicted since) is copied out whole: it enters first.
            self.layers_ready()
        self._publish_disk_events()
        if not self._pending:
            return
        hashes = list(self._pending)
        ids = list(self._pending.values())
        self._pending.clear()
        if self.host is None:  # only as many as the disk writer has room for leave the pool
            pays = self.write_through or self.cost.pays("disk")
            admitted = [(h, b) for h, b in zip(hashes, ids, strict=True)
                        if h not in self.disk and (pays or self._trickle())]
            hashes, ids = [h for h, _ in admitted], [b for _, b in admitted]
            room = self.disk.room()
            self.disk.drop(len(hashes[room:]))
            if room and hashes:
                self._to_disk(hashes[:room], self._gather(ids[:room]))
                self.counters.offloaded += len(hashes[:room])
            return
        if self._batched:
            gathered = self._gather(ids)
            done = None
            if self._stream is not None:
                done = torch.cuda.Event()
                done.record()
            self._unsettled = _Snapshot(hashes, gathered, done)
            return
        self._store(hashes, ids)

    def _publish_disk_events(self) -> None:
        """The disk writer's stored/removed events since the last flush, in their order, one
        publish per run of one kind (not one per block)."""
        run: list[int] = []
        stored = False
        while self._disk_events:
            kind, h = self._disk_events.popleft()
            if run and kind != stored:
                self._emit_all(stored, run, "disk")
                run = []
            stored = kind
            run.append(h)
        self._emit_all(stored, run, "disk")

    def settle(self) -> None:
        """Finish the last :meth:`flush`'s offload on CUDA's path (see there); nothing to do
        otherwise. The engine calls it while the model step runs."""
        snapshot, self._unsettled = self._unsettled, None
        if snapshot is None:
            return
        if self._stream is not None:
            self._stream.wait_event(snapshot.done)
        self._store(snapshot.hashes, list(range(len(snapshot.hashes))), snapshot.gathered)

    def _store(self, hashes: list[int], sources: list[int], gathered: torch.Tensor | None = None) -> None:
        """Blocks ``hashes`` into the host tier from pool blocks ``sources`` (CPU) or rows
        ``sources`` of ``gathered`` (CUDA's path), then on to disk under write-through."""
        held = [i for i, h in enumerate(hashes) if h in self.host]
        if held:  # already stored (evicted again before a deferred store): a use of it
            for i in held:
                self.host.touch(hashes[i])
            keep = [i for i, h in enumerate(hashes) if h not in self.host]
            hashes, sources = [hashes[i] for i in keep], [sources[i] for i in keep]
        # A batch larger than the host tier goes in parts: within one, no block of the batch
        # is evicted by another (reserve_many); a later part may evict an earlier one's,
        # whose copy is issued by then.
        cap = self.host.capacity
        for start in range(0, len(hashes), cap):
            self._offload(hashes[start : start + cap], sources[start : start + cap], gathered)
        if self.write_through and self.disk is not None:
            for h in hashes:
                slot = self.host.slot_of(h)
                if slot is not None and h not in self.disk:
                    self.host.hold(slot)
                    self._lend(h, slot)

    def _offload(self, hashes: list[int], sources: list[int], gathered: torch.Tensor | None) -> None:
        """Blocks ``hashes`` (at most the host tier's capacity; pool blocks or rows of
        ``gathered``: see :meth:`_store`) into the host tier, and what they evict on to disk."""
        decided: dict[int, bool] = {}  # one decision per evicted block (it may be asked twice)
        pays = self.disk is not None and self.cost.pays("disk")

        def spills(block_hash: int) -> bool:
            if block_hash not in decided:
                decided[block_hash] = self._spills_to_disk(block_hash, pays)
            return decided[block_hash]

        slots, victims = self.host.reserve_many(hashes, keep=spills)
        removed: list[int] = []
        lent: list[tuple[int, int]] = []  # (hash, slot): spilled to disk from the slot itself
        for old, old_slot, kept in victims:
            removed.append(old)
            if kept:
                lent.append((old, old_slot))
            elif spills(old) and not self.disk.full():
                # No spare slot to stand in (a host tier built without spares): copy it out
                # before the slot is written again.
                self.disk.submit(old, self.host.slot(old_slot).clone())
        placed = sorted((slot, src, h) for h, src, slot in zip(hashes, sources, slots, strict=True) if slot is not None)
        if placed:
            slots = [slot for slot, _, _ in placed]
            sources = [src for _, src, _ in placed]
            if gathered is None:
                self._copy_out(slots, sources)
            else:
                self._copy_rows_out(slots, sources, gathered)
        self.counters.offloaded += len(placed)
        # Stored first: a block of this batch that a later part evicted is gone at the end.
        self._emit_all(True, [h for _, _, h in placed], "cpu")
        self._emit_all(False, removed, "cpu")
        for h, slot in lent:
            self._lend(h, slot)

    def _copy_out(self, slots: list[int], block_ids: list[int]) -> None:
        """CPU: pool blocks ``block_ids`` straight into host slots ``slots`` (one each)."""
        host = self.host.data.view(torch.uint8)
        if self._stacked is not None:  # a block of every layer is one strided view
            stacked = self._stacked.view(torch.uint8)
            for slot, b in zip(slots, block_ids, strict=True):
                host[slot].copy_(stacked[:, :, b])
            return
        caches = [c.view(torch.uint8) for c in self.kv_caches]
        for slot, b in zip(slots, block_ids, strict=True):
            torch.stack([c[:, b] for c in caches], out=host[slot])

    def _copy_rows_out(self, slots: list[int], rows: list[int], gathered: torch.Tensor) -> None:
        """Rows ``rows`` of ``gathered`` into host slots ``slots`` (ascending, one per row),
        one copy per run where both go up by one; on CUDA on the offload stream (which
        waited for the gather), the slots carrying its event."""
        data = self.host.data
        off = self._stream
        if off is None:  # CPU (tests run CUDA's path so): the same copies, synchronous
            for slot, row, count in pair_runs(slots, rows):
                data[slot : slot + count].copy_(gathered[row : row + count])
            return
        off.wait_stream(self._load_stream)  # loads still reading slots about to be rewritten
        with torch.cuda.stream(off):
            for slot, row, count in pair_runs(slots, rows):
                data[slot : slot + count].copy_(gathered[row : row + count], non_blocking=True)
            event = torch.cuda.Event()
            event.record(off)
        gathered.record_stream(off)
        self.host.mark_pending(slots, event)

    def _lend(self, block_hash: int, slot: int) -> None:
        """Write host slot ``slot`` (already held) to disk as ``block_hash``; the writer gives
        the slot back when done, or it comes back now if the write was dropped."""
        if not self.disk.submit(block_hash, self.host.data[slot], ready=self.host.pending_event(slot),
                                done=lambda: self.host.release(slot)):
            self.host.release(slot)

    def _to_disk(self, hashes: list[int], gathered: torch.Tensor) -> None:
        """No host tier: hand the blocks to the disk writer (on CUDA through pinned memory,
        copied asynchronously: the writer waits for the copy, not the engine)."""
        ready = None
        if self._stream is not None:
            cpu = torch.empty(gathered.shape, dtype=gathered.dtype, pin_memory=True)
            cpu.copy_(gathered, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            gathered = cpu
        for h, block in zip(hashes, gathered, strict=True):
            self.disk.submit(h, block, ready=ready)

    def _index_tensor(self, ids: list[int]) -> torch.Tensor:
        """``ids`` as an index tensor on the device, without waiting for the device (a plain
        ``torch.tensor(ids, device="cuda")`` copies from pageable memory and synchronizes)."""
        if self._stream is None:
            return torch.tensor(ids)
        return torch.tensor(ids, pin_memory=True).to(self.device, non_blocking=True)

    def _gather(self, block_ids: list[int]) -> torch.Tensor:
        """Pool blocks ``block_ids`` of every layer as ``[n, layers, 2, block_size, heads,
        dim]`` (a new tensor on the device)."""
        ids = self._index_tensor(block_ids)
        # As bytes: CPU has no index_select for an fp8 (kv_cache_dtype fp8_e4m3) cache. Each
        # layer's blocks go straight to their place (a stack, then a contiguous permute,
        # copied every byte twice more).
        c = self.kv_caches[0]
        if self._stacked is not None:
            return (self._stacked.view(torch.uint8).index_select(2, ids)
                    .permute(2, 0, 1, 3, 4, 5).contiguous().view(c.dtype))
        out = torch.empty((len(block_ids), len(self.kv_caches), 2, *c.shape[2:-1], c.shape[-1] * c.element_size()),
                          dtype=torch.uint8, device=self.device)
        for layer, cache in enumerate(self.kv_caches):
            out[:, layer].copy_(cache.view(torch.uint8).index_select(1, ids).transpose(0, 1))
        return out.view(c.dtype)

    def _spills_to_disk(self, block_hash: int, pays: bool) -> bool:
        """Whether a block the host tier evicts is written to disk: write-back with a disk
        tier that lacks it (write-through already wrote it), while disk loads ``pays``, or
        within the trickle that keeps the disk measured while they do not (TRICKLE_BLOCKS)."""
        if self.disk is None or self.write_through or block_hash in self.disk:
            return False
        return pays or self._trickle()

    def _trickle(self) -> bool:
        """While disk loads do not pay: whether one more block may go to disk in this
        PROBE_S window (TRICKLE_BLOCKS of them); the others count unwritten."""
        now = time.monotonic()
        if now >= self._trickle_until:
            self._trickle_until, self._trickle_left = now + PROBE_S, TRICKLE_BLOCKS
        if self._trickle_left > 0:
            self._trickle_left -= 1
            return True
        self.counters.unwritten += 1
        return False

    # -- lookup and load --------------------------------------------------------------------

    def available(self, hashes: list[int]) -> int:
        """How many leading ``hashes`` the host or disk tier holds (nothing is touched)."""
        return len(self._sources(hashes))

    def _sources(self, hashes: list[int]) -> list[str]:
        """Where each block of the leading run of ``hashes`` the tiers hold would come from:
        "memory" (the host tier, or a finished read) or "disk" (a read to start or finish)."""
        self.settle()
        sources = []
        for h in hashes:
            read = self._reads.get(h)
            if read is not None and read.future.done() and not read.ok():  # dropped by the disk tier
                self._free_slots.append(self._reads.pop(h).slot)
                read = None
            if self.host is not None and h in self.host or read is not None and read.ok():
                sources.append("memory")
            elif read is not None and not read.future.done() or self.disk is not None and h in self.disk:
                sources.append("disk")
            else:  # not held, or its read failed its checks (the disk tier dropped it)
                break
        return sources

    def prefetch(self, hashes: list[int]) -> int:
        """Start reading the disk blocks of the leading run of ``hashes`` the tiers hold, as
        far as a plan would load them now (see :meth:`plan`); returns how many reads started.

        Reads a plan will not load are not started: they would only compete with the
        engine (for the disk, the memory bus and, for their checksums, the GIL) while the
        request recomputes those blocks anyway. While the cost model judges the disk slower
        than recomputing, a probe of at most ``PROBE_BLOCKS`` reads every ``PROBE_S`` keeps
        the disk measured, so a disk that got faster (its files now in the page cache, say)
        is noticed."""
        sources = self._sources(hashes)
        n = self.cost.blocks_to_load(sources)
        if n < len(sources) and "disk" in sources[n:]:
            now = time.monotonic()
            if now >= self._next_probe:
                self._next_probe = now + PROBE_S
                probe = [i for i in range(n, len(sources)) if sources[i] == "disk"][:PROBE_BLOCKS]
                n = probe[-1] + 1 if probe else n
        batch: list[Future[tuple[bool, float]]] = []
        keep = set(hashes[:n])
        for h, source in zip(hashes[:n], sources, strict=False):
            if source == "disk" and h not in self._reads and not self._start_read(h, keep, batch):
                break
        self._submit_reads()
        self.counters.prefetched += len(batch)
        return len(batch)

    def plan(self, hashes: list[int]) -> int | None:
        """How many of the leading ``hashes`` to :meth:`load` now: the run the tiers hold, as
        far as loading beats recomputing (the rest is counted ``skipped``). None while disk
        reads the load needs are in flight (started here if they were not): the request waits
        for them, the engine runs the others."""
        self._collect_timings()
        sources = self._sources(hashes)
        n = self.cost.blocks_to_load(sources)
        if not n and sources and sources[0] == "memory":
            # Judged slower than recomputing: still load a few now and then, so that the
            # estimate follows the device (one bad measurement must not turn loads off).
            now = time.monotonic()
            if now >= self._next_memory_probe:
                self._next_memory_probe = now + PROBE_S
                n = next((i for i, s in enumerate(sources[:PROBE_BLOCKS]) if s != "memory"),
                         min(PROBE_BLOCKS, len(sources)))
        waiting = False
        hold = time.perf_counter() + HOLD_S
        batch: list[Future[tuple[bool, float]]] = []
        keep = set(hashes[:n])
        for i, (h, source) in enumerate(zip(hashes[:n], sources, strict=False)):
            if source == "disk" and h not in self._reads and not self._start_read(h, keep, batch):
                n = i  # no staging slot left: the rest is recomputed
                break
            read = self._reads.get(h)
            if read is not None:
                read.held_until = hold
                waiting = waiting or not read.future.done()
        self._submit_reads()
        if waiting:
            return None
        self.counters.skipped += len(sources) - n
        return n

    def reads_in_flight(self) -> list[Future[tuple[bool, float]]]:
        """The disk reads not finished yet (an engine with nothing else to run waits for one
        of them, without the lock, instead of spinning)."""
        return [r.future for r in self._reads.values() if not r.future.done()]

    def _start_read(self, h: int, keep: set[int], batch: list[Future[tuple[bool, float]]]) -> bool:
        """Start reading block ``h`` into a free staging slot (its future joins ``batch``);
        False when there is none (see :meth:`_claim_slot`: the reads of ``keep`` are not
        taken from)."""
        slot = self._claim_slot(keep)
        if slot is None:
            return False
        if not batch:
            self._batches.append((time.perf_counter(), batch))
        read = _Read(slot, Future())
        self._reads[h] = read
        self._unsubmitted.append((h, slot, read.future))
        batch.append(read.future)
        return True

    def _submit_reads(self) -> None:
        """Hand the reads started since the last call to the reader threads: split in as many
        runs as there are readers, one task each (a task per block cost the engine thread a
        submission, and the readers a wake-up and a GIL take, per block)."""
        todo, self._unsubmitted = self._unsubmitted, []
        step = -(-len(todo) // READERS)
        for start in range(0, len(todo), step or 1):
            self._reader.submit(self._read_run, todo[start : start + step])

    def _read_run(self, reads: list[tuple[int, int, Future[tuple[bool, float]]]]) -> None:
        """On a reader thread: reads ``(hash, staging slot, future)`` one after the other,
        each future answering :meth:`_read`'s result (a cancelled one is skipped)."""
        for h, slot, future in reads:
            if future.set_running_or_notify_cancel():
                future.set_result(self._read(h, slot))

    def _read(self, h: int, slot: int) -> tuple[bool, float]:
        """On a reader thread: whether block ``h`` is in staging slot ``slot`` now, and when
        the read ended. Never raises: a read that fails costs a recompute."""
        try:
            ok = self.disk.read_into(h, self._staging[slot])
        except Exception:
            log.exception("reading KV block %016x from disk failed; it will be recomputed", h)
            ok = False
        return ok, time.perf_counter()

    def _claim_slot(self, keep: set[int]) -> int | None:
        """A free staging slot: one free, or released by a finished copy, or else the slot of
        the oldest finished read that no plan holds and ``keep`` does not name; None when
        every slot is busy (reads in flight, or held for waiting requests)."""
        while self._releasing and self._releasing[0][0].query():
            self._free_slots += self._releasing.popleft()[1]
        if not self._free_slots and self._releasing:
            event, slots = self._releasing.popleft()
            event.synchronize()
            self._free_slots += slots
        if not self._free_slots:
            now = time.perf_counter()
            done = next((h for h, r in self._reads.items()
                         if r.future.done() and r.held_until <= now and h not in keep), None)
            if done is None:
                return None
            self._free_slots.append(self._reads.pop(done).slot)
        return self._free_slots.pop()

    def load(self, hashes: list[int], block_ids: list[int], overlap: bool = True) -> int:
        """Copy the blocks of the leading run of ``hashes`` that are in host memory (the host
        tier's, and finished disk reads: see :meth:`plan`) into pool blocks ``block_ids``
        (one per hash); returns how many were loaded (the rest is recomputed).

        ``overlap``: the step that reads them will run eagerly, so with layer-wise loads on
        they go group of layers by group (see :meth:`layer_ready`); False for a step that
        will replay a CUDA graph (a graph calls no layer hook: the blocks go in whole, the
        copies at full speed).

        The engine thread's own time for it (what a GPU's asynchronous copies do not hide)
        is measured per block for the cost model, beside the copies' bandwidth: as the
        thread's CPU time, which a thread descheduled on a busy host does not inflate."""
        self.flush()  # the blocks being filled may have just been evicted
        c0 = time.thread_time()
        picks: list[tuple[int, int]] = []  # per block: (HOST or STAGING, slot)
        staged: list[int] = []  # staging slots given back once their copy is done
        for h in hashes[: len(block_ids)]:
            slot = self.host.lookup(h) if self.host is not None else None
            if slot is not None:
                picks.append((HOST, slot))
                continue
            read = self._reads.get(h)
            if read is None or not read.ok():
                break
            del self._reads[h]
            picks.append((STAGING, read.slot))
            staged.append(read.slot)
        n = len(picks)
        if not n:
            return 0
        self.counters.disk_hits += len(staged)
        self.counters.cpu_hits += n - len(staged)
        copy_cpu_s = 0.0  # on CPU the copies are the thread's own work: counted as bandwidth
        if self._stream is None:
            t0, t0_cpu = time.perf_counter(), time.thread_time()
            if self.layerwise and overlap:  # CUDA's layer-wise path, synchronous copies (tests run it so)
                staged_blocks = torch.empty((n, self.block_bytes), dtype=torch.uint8)
                order, events = self._stage_layers(staged_blocks, picks, None)
                self._defer(staged_blocks, events, [block_ids[i] for i in order])
            else:
                (self._copy_in_batched if self._batched else self._copy_in)(picks, block_ids[:n])
            self.cost.observe_load("memory", n * self.block_bytes, time.perf_counter() - t0)
            copy_cpu_s = time.thread_time() - t0_cpu
            self._free_slots += staged
        else:
            self._copy_in_cuda(picks, staged, block_ids[:n], self.layerwise and overlap)
        self.cost.observe_overhead(n, time.thread_time() - c0 - copy_cpu_s)
        self.counters.loaded += n
        return n

    def _layer_views(self, blocks: torch.Tensor) -> torch.Tensor:
        """Flat uint8 blocks ``[..., block bytes]`` as ``[..., layers, 2, block_size, heads,
        row bytes]``."""
        c = self.kv_caches[0]
        return blocks.view(*blocks.shape[:-1], len(self.kv_caches), 2, *c.shape[2:-1], -1)

    def _buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The host tier's slots and the staging slots, as flat uint8 blocks (by HOST and
        STAGING)."""
        host = self.host.flat if self.host is not None else self._staging[:0]
        return host, self._staging

    def _copy_in(self, picks: list[tuple[int, int]], block_ids: list[int]) -> None:
        """CPU: each block's layers straight into the caches (index_copy_ on CPU is many times
        slower than these plain copies)."""
        buffers = self._buffers()
        if self._stacked is not None:  # a block of every layer is one strided view
            stacked = self._stacked.view(torch.uint8)
            for (source, slot), b in zip(picks, block_ids, strict=True):
                stacked[:, :, b].copy_(self._layer_views(buffers[source][slot]))
            return
        caches = [c.view(torch.uint8) for c in self.kv_caches]
        for (source, slot), b in zip(picks, block_ids, strict=True):
            layers = self._layer_views(buffers[source][slot])
            for layer, cache in enumerate(caches):
                cache[:, b].copy_(layers[layer])

    def _copy_in_cuda(self, picks: list[tuple[int, int]], staged_slots: list[int],
                      block_ids: list[int], layered: bool = False) -> None:
        """CUDA: the blocks to the device on the load stream, in source order so that
        adjacent slots of one buffer take one asynchronous copy (after any copy still filling
        a host slot, waited for on the stream, not here), then into the pool blocks on the
        compute stream, which waits for the load stream (:meth:`_scatter`)."""
        n = len(picks)
        main = torch.cuda.current_stream(self.device)
        load = self._load_stream
        # ``staged`` is the compute stream's memory until now, and the pool blocks about to
        # be filled were last read there (the gather of what this allocation evicted, queued
        # by the flush in load): the load stream starts after all of it.
        load.wait_stream(main)
        if self.host is not None:
            pending = {id(e): e for src, slot in picks
                       if src == HOST and (e := self.host.pending_event(slot)) is not None}
            for event in pending.values():
                load.wait_event(event)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if layered:
            # The group copies on the load stream, nothing waited for here: the compute
            # stream waits for each group's event only when the forward reaches the group
            # (layer_ready), or for all of them before anything else touches these blocks.
            # ``staged`` is allocated here, on the compute stream, which reads it last.
            staged = torch.empty((n, self.block_bytes), dtype=torch.uint8, device=self.device)
            with torch.cuda.stream(load):
                start.record(load)
                order, events = self._stage_layers(staged, picks, load)
                end.record(load)
            staged.record_stream(load)
            self._timings.append((start, end, n * self.block_bytes))
            if staged_slots:
                self._releasing.append((end, staged_slots))
            self._defer(staged, events, [block_ids[i] for i in order])
            return
        order, runs = source_runs(picks)
        staged = torch.empty((n, self.block_bytes), dtype=torch.uint8, device=self.device)
        with torch.cuda.stream(load):
            start.record()
            self._stage(staged, runs, non_blocking=True)
            end.record()
        main.wait_event(end)
        staged.record_stream(load)
        self._timings.append((start, end, n * self.block_bytes))
        if staged_slots:
            self._releasing.append((end, staged_slots))
        self._scatter(staged, [block_ids[i] for i in order])

    def _copy_in_batched(self, picks: list[tuple[int, int]], block_ids: list[int]) -> None:
        """:meth:`_copy_in_cuda`'s copies on CPU, synchronous (tests run CUDA's path so)."""
        order, runs = source_runs(picks)
        staged = torch.empty((len(picks), self.block_bytes), dtype=torch.uint8)
        self._stage(staged, runs, non_blocking=False)
        self._scatter(staged, [block_ids[i] for i in order])

    def _stage_layers(self, staged: torch.Tensor, picks: list[tuple[int, int]],
                      stream: torch.cuda.Stream | None) -> tuple[list[int], list[torch.cuda.Event | None]]:
        """Blocks ``picks`` into ``staged`` (flat blocks on the device), group of layers by
        group: on ``stream`` (the load stream, asynchronous), each group's copies followed by
        its event; synchronous on CPU (``stream`` None: no events). Returns ``order`` (row k
        of ``staged`` is pick ``order[k]``, see :func:`source_runs`) and the events."""
        order, runs = source_runs(picks)
        width = self.block_bytes // self._groups
        rows = staged.view(len(picks), self._groups, width)
        buffers = [b.view(len(b), self._groups, width) for b in self._buffers()]
        events: list[torch.cuda.Event | None] = []
        for g in range(self._groups):
            # One copy per block: a group's layers are contiguous within a block's slot but
            # not across slots. The views come a run of adjacent slots at a time, and one
            # call issues every copy (no Python per block).
            dst: list[torch.Tensor] = []
            src: list[torch.Tensor] = []
            for source, slot, at, count in runs:
                dst += rows[at : at + count, g].unbind(0)
                src += buffers[source][slot : slot + count, g].unbind(0)
            torch._foreach_copy_(dst, src, non_blocking=stream is not None)
            event = None
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
            events.append(event)
        return order, events

    def _defer(self, staged: torch.Tensor, events: list[torch.cuda.Event | None], block_ids: list[int]) -> None:
        """``staged`` (:meth:`_stage_layers`; row k into pool block ``block_ids[k]``) goes
        into the pool as the forward reaches its layers (:meth:`layer_ready`), or all at once
        (:meth:`layers_ready`)."""
        ids = self._index_tensor(block_ids)  # sent on the compute stream, which reads it
        layered = _LayerLoad(ids, staged, events)
        with self._layer_lock:
            self._layer_loads = [*self._layer_loads, layered]
            self._layer_blocks.update(block_ids)

    @property
    def layers_pending(self) -> bool:
        """Whether a layer-wise load has groups not in the pool yet."""
        return bool(self._layer_loads)

    def layer_ready(self, layer: int) -> None:
        """Before layer ``layer`` of a forward reads the KV caches: every layer-wise load's
        groups up to this layer's go into the pool (the model's layer loop calls it; with
        nothing loading it is one test)."""
        if self._layer_loads:
            self._ready_groups(layer // self._group_layers + 1)

    def layers_ready(self) -> None:
        """Every layer-wise load's remaining groups into the pool now (after a step, before
        a graph replay, an export or an eviction of those blocks)."""
        if self._layer_loads:
            self._ready_groups(self._groups)

    def _ready_groups(self, groups: int) -> None:
        """The first ``groups`` groups of every pending layer-wise load into the pool.

        Ordering on CUDA: each group's scatter is queued on the compute stream after a wait
        for that group's copies (its event on the load stream), so it reads complete bytes;
        the layer's attention is queued after the scatter on the same stream, so it reads
        the loaded blocks; anything queued on the compute stream later (the next step, a
        gather that offloads these blocks) comes after the scatter too. The load stream
        started after everything the compute stream had queued (see _copy_in_cuda), so no
        earlier reader of these blocks sees the new bytes. On CPU the copies were done when
        the load returned and the scatter is a plain copy, now."""
        with self._layer_lock:
            main = torch.cuda.current_stream(self.device) if self._stream is not None else None
            stacked = self._stacked.view(torch.uint8)
            step = self._group_layers
            for load in self._layer_loads:
                layers = self._layer_views(load.staged)  # [n, layers, 2, bs, heads, row bytes]
                for g in range(load.next_group, groups):
                    if load.events[g] is not None:
                        main.wait_event(load.events[g])
                    a, b = g * step, (g + 1) * step
                    stacked[a:b].index_copy_(2, load.ids, layers[:, a:b].permute(1, 2, 0, 3, 4, 5))
                load.next_group = max(load.next_group, groups)
            self._layer_loads = [load for load in self._layer_loads if load.next_group < self._groups]
            if not self._layer_loads:
                self._layer_blocks.clear()

    def _stage(self, staged: torch.Tensor, runs: list[tuple[int, int, int, int]], non_blocking: bool) -> None:
        """Fill ``staged`` (flat blocks) from the host and staging slots, one copy per run."""
        buffers = self._buffers()
        for source, slot, at, count in runs:
            staged[at : at + count].copy_(buffers[source][slot : slot + count], non_blocking=non_blocking)

    def _scatter(self, staged: torch.Tensor, block_ids: list[int]) -> None:
        """Flat blocks ``staged`` into pool blocks ``block_ids`` (one each, in order): one
        index_copy_ (one per layer for caches not stacked)."""
        ids = self._index_tensor(block_ids)
        layers = self._layer_views(staged)
        if self._stacked is not None:
            self._stacked.view(torch.uint8).index_copy_(2, ids, layers.permute(1, 2, 0, 3, 4, 5))
            return
        for layer, cache in enumerate(self.kv_caches):
            cache.view(torch.uint8).index_copy_(1, ids, layers[:, layer].transpose(0, 1))

    def _collect_timings(self) -> None:
        """Feed the cost model the CUDA copies and the batches of disk reads that have
        finished since last time."""
        while self._timings and self._timings[0][1].query():
            start, end, nbytes = self._timings.popleft()
            self.cost.observe_load("memory", nbytes, start.elapsed_time(end) / 1e3)
        pending = []
        for started, futures in self._batches:
            if all(f.done() for f in futures):
                ended = max(started if f.cancelled() else f.result()[1] for f in futures)
                self.cost.observe_load("disk", len(futures) * self.block_bytes, ended - started)
            else:
                pending.append((started, futures))
        self._batches = pending

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """A model step computed ``tokens`` tokens of prompts in ``seconds``: the engine's
        prefill speed, the other side of the cost model."""
        self.cost.observe_prefill(tokens, seconds)

    def peek(self, hashes: list[int]) -> list[torch.Tensor]:
        """CPU copies of the blocks of the leading run of ``hashes`` the tiers hold, without
        loading them into the pool or counting hits (a session's export: migration,
        checkpoints, backups)."""
        self.flush()  # a block evicted a moment ago is in the host tier after this
        self.settle()
        shape = self.block_shape(self.kv_caches)
        dtype = self.kv_caches[0].dtype
        blocks: list[torch.Tensor] = []
        for h in hashes:
            slot = self.host.lookup(h) if self.host is not None else None
            read = self._reads.get(h)
            if slot is not None:
                block = self.host.slot(slot).clone()
            elif read is not None and (read.future.result()[0]):
                block = self._staging[read.slot].clone().view(dtype).view(shape)
            else:
                block = self.disk.read(h) if self.disk is not None else None
            if block is None:
                break
            blocks.append(block)
        return blocks

    # -- lifecycle --------------------------------------------------------------------------

    def persist(self, gpu_blocks: list[tuple[int, int]], budget_s: float = PERSIST_BUDGET_S) -> int:
        """Write blocks not on disk yet to it, blocking, for at most ``budget_s`` (a node
        stopping has a grace period to keep): the host tier's first, then the GPU pool's
        ``(hash, block id)``; returns how many were written. Under write-back this is what
        makes a stopped node's cache outlive it."""
        if self.disk is None or not self.disk.enabled:
            return 0
        deadline = time.monotonic() + budget_s
        self.layers_ready()  # the GPU blocks gathered below hold all their layers first
        self.flush()
        self.settle()
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
            from_gpu = iter(self._gather(gpu).cpu()) if gpu else iter(())
            for h, b in chunk:
                block = next(from_gpu) if b is not None else self.host.slot(self.host.lookup(h))
                written += self.disk.write_now(h, block)
        return written

    def clear(self) -> int:
        """Drop every block of both tiers (disk files included); returns how many."""
        self.layers_ready()
        self._pending.clear()
        self._unsettled = None
        self._drop_reads()
        n = 0
        if self.host is not None:
            self._emit_all(False, self.host.hashes(), "cpu")
            n += self.host.clear()
        if self.disk is not None:
            n += self.disk.clear()
        return n

    def close(self) -> None:
        """Stop the readers and the disk writer (queued writes finish first)."""
        self._unsettled = None
        if self._reader is not None:
            self._reader.shutdown(wait=True, cancel_futures=True)
            self._drop_reads()
        if self.disk is not None:
            self.disk.close()

    def calibrate(self, block_ids: list[int]) -> None:
        """Measure loads from host memory before serving, so the first requests' load or
        recompute choice weighs this device's figures: host slots copied into pool blocks
        ``block_ids`` (free ones, allocated by the caller: they end up holding garbage)
        ``CALIBRATION_ROUNDS`` times, the last round fed to the cost model (on CUDA the
        engine thread's time and the copies' own, timed by events)."""
        if self.host is None or not block_ids:
            return
        n = min(len(block_ids), len(self.host.data), CALIBRATION_BLOCKS)
        picks, ids = [(HOST, slot) for slot in range(n)], block_ids[:n]
        for _ in range(CALIBRATION_ROUNDS):
            self.cost = TierCostModel(self.block_bytes, self.identity.block_size)
            self._timings.clear()
            t0, c0 = time.perf_counter(), time.thread_time()
            if self._stream is None:
                (self._copy_in_batched if self._batched else self._copy_in)(picks, ids)
                self.cost.observe_load("memory", n * self.block_bytes, time.perf_counter() - t0)
            else:
                self._copy_in_cuda(picks, [], ids)
                self.cost.observe_overhead(n, time.thread_time() - c0)
                torch.cuda.synchronize(self.device)
                self._collect_timings()

    def reset_stats(self) -> None:
        """Zero the counters and forget the cost model's measurements (after warmup, whose
        steps include kernel compiles: their times say nothing about serving)."""
        self.counters = TierCounters()
        self.cost = TierCostModel(self.block_bytes, self.identity.block_size)

    def stats(self) -> dict:
        """Per-tier counters for ``Engine.stats()['kv_tiers']``."""
        c = self.counters
        out: dict = {"offloaded": c.offloaded, "loaded": c.loaded, "prefetched": c.prefetched,
                     "skipped": c.skipped, "unwritten": c.unwritten, "cost": self.cost.stats(),
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

    def _drop_reads(self) -> None:
        """Forget every read (those in flight end first: their slots are written to)."""
        for read in self._reads.values():
            if not read.future.cancel():
                wait_futures([read.future])
            self._free_slots.append(read.slot)
        self._reads.clear()
        self._batches.clear()

    def _emit_all(self, stored: bool, hashes: list[int], tier: str) -> None:
        if self.publish is not None and hashes:
            self.publish(stored, hashes, tier)


def stacked_kv(kv_caches: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The per-layer caches as one ``[layers, *cache shape]`` view, when they are contiguous
    and lie back to back in one storage (see ``node.engine.zeroed_kv_layers``); else None."""
    first = kv_caches[0]
    step = first.numel()
    for i, cache in enumerate(kv_caches):
        if (not cache.is_contiguous() or cache.shape != first.shape or cache.dtype != first.dtype
                or cache.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or cache.storage_offset() != first.storage_offset() + i * step):
            return None
    return first.as_strided((len(kv_caches), *first.shape), (step, *first.stride()))


def pair_runs(slots: list[int], rows: list[int]) -> list[tuple[int, int, int]]:
    """``(first slot, first row, count)`` for each run of ``(slot, row)`` pairs in which both
    go up by one: rows ``first row ..`` go to slots ``first slot ..`` in one copy."""
    runs: list[tuple[int, int, int]] = []
    for slot, row in zip(slots, rows, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == slot and runs[-1][1] + runs[-1][2] == row:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((slot, row, 1))
    return runs


def source_runs(picks: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int, int, int]]]:
    """Where to copy blocks ``picks`` (``(buffer, slot)`` each) from in as few copies as can
    be: ``order`` (the picks by buffer, then slot: staged block ``k`` is pick ``order[k]``)
    and the runs ``(buffer, first slot, first staged block, count)`` of adjacent slots of one
    buffer."""
    order = sorted(range(len(picks)), key=picks.__getitem__)
    runs: list[tuple[int, int, int, int]] = []
    for k, i in enumerate(order):
        source, slot = picks[i]
        if runs and runs[-1][0] == source and runs[-1][1] + runs[-1][3] == slot:
            runs[-1] = (source, runs[-1][1], runs[-1][2], runs[-1][3] + 1)
        else:
            runs.append((source, slot, k, 1))
    return order, runs
