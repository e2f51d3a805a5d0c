"""The disk KV tier: one block file per block (cluster/block_file.py) under a directory that
outlives the process, so a restarted node has its cache back.

Files live in ``<directory>/<namespace>/<hash:016x>.kvb``; the namespace names the model
fingerprint, KV dtype and block size, so blocks of another model or format are never read
as this one's. At start the index is rebuilt by listing the namespace: leftover temp files
are removed, and so are files whose size is not a block file's (truncated); a file whose
bytes are corrupted is found when read (its checksum fails), dropped and counted, and the
block is recomputed: never served. Files of the previous block-file version (sha256) stay
in the index and are read as they are; new blocks are written in the current version.

A read goes straight into the caller's buffer (:meth:`DiskTier.read_into`: one ``preadv``
into a staging slot, pinned on CUDA), so a hit costs a system call and a checksum, with no
copy in between.

Per block, the writer and the readers keep their Python work and their system calls few:
each system call hands the GIL back, and each take of it back delays the engine thread (on a
GPU node, its next kernel launch). Headers come from bytes made once (cluster/block_file.py
``BlockFormat``), paths are plain strings, a write is open + one ``writev`` + close + rename
and a read open + one ``preadv`` + close (benchmarks/profile_disk_engine_cost.py).

Writes go through a bounded queue to one writer thread; when the queue is full the block is
dropped (a future miss, never corruption). A submitted block may be a view of memory that is
still being filled (an asynchronous device-to-host copy: the writer waits for its ``ready``
event, off the engine thread) and that the caller lends until the write is over (``done`` is
then called, on the writer thread): a host-tier slot spills to disk without a copy.

Any OS error while writing (disk full, read-only or vanished directory) turns the tier off
with one logged error: the node serves on without it, and no request fails because of it.
The directory is capped at ``capacity_bytes``; which file goes first is the configured eviction policy's choice.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from ultrakv.cluster.block_file import (
    SUFFIX,
    TMP_SUFFIX,
    BlockFileError,
    BlockFormat,
    BlockHeader,
    file_size,
    read_block_file_into,
    write_atomic,
)
from ultrakv.node.kv.eviction import EvictionPolicy, make_policy

log = logging.getLogger("ultrakv.node.kv.disk_tier")

Observer = Callable[[str, int], None]  # ("stored" | "removed", block hash)
# Blocks waiting for the writer at most; more are dropped (a future miss).
QUEUE_BLOCKS = 64
# The file a tier holds locked (flock) while it uses its directory.
LOCK_NAME = ".ultrakv-lock"


@dataclass
class _Write:
    """A queued write: the block's bytes (a CPU tensor), the CUDA event after which they are
    in place (None: already are), and what to call once the writer is done with them."""

    block_hash: int
    block: torch.Tensor
    ready: torch.cuda.Event | None = None
    done: Callable[[], None] | None = None


class DiskTier:
    """Block files by hash in ``directory / namespace``, at most ``capacity_bytes`` of them.

    ``key_of(hash)`` is the identity written in each file's header and checked on read;
    ``block_shape`` and ``dtype`` describe every block. Thread-safe: the engine thread looks
    up, reads and submits; the writer thread writes and evicts.
    """

    def __init__(self, directory: str | Path, namespace: str, key_of: Callable[[int], str],
                 block_shape: tuple[int, ...], dtype: torch.dtype, capacity_bytes: int,
                 policy: str = "lru", queue_blocks: int = QUEUE_BLOCKS,
                 observer: Observer | None = None) -> None:
        self.directory = Path(directory) / namespace
        self._prefix = f"{self.directory}{os.sep}"  # block paths are built as strings (no pathlib per block)
        self.key_of = key_of
        self.block_shape = block_shape
        self.dtype = dtype
        nbytes = dtype.itemsize
        for d in block_shape:
            nbytes *= d
        header = BlockHeader(key_of(0), block_shape, str(dtype).removeprefix("torch."))
        self.block_bytes = nbytes
        self.file_bytes = file_size(header, nbytes)
        self._file_sizes = {file_size(header, nbytes, version) for version in (1, 2)}
        self._dtype_name = header.dtype
        self._format = BlockFormat(block_shape, header.dtype, nbytes)
        self.capacity = max(1, capacity_bytes // self.file_bytes)
        self.policy: EvictionPolicy = make_policy(policy, self.capacity)
        self.observer = observer
        self.enabled = True
        self.writes = 0
        self.dropped = 0  # blocks not written: queue full or tier off
        self.corrupted = 0  # files that failed their check on read (dropped, recomputed)
        self.evictions = 0
        self._index: set[int] = set()
        self._lock = threading.Lock()
        self.queue_blocks = queue_blocks
        self._queue: queue.Queue[_Write | None] = queue.Queue(queue_blocks)
        self._writer: threading.Thread | None = None
        self._lock_file: int | None = None
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._take_directory()
            self._scan()
        except OSError as exc:
            self._disable(f"cannot use {self.directory}", exc)
            return
        self._writer = threading.Thread(target=self._write_loop, name="ultrakv-kv-disk", daemon=True)
        self._writer.start()

    def _take_directory(self) -> None:
        """Hold the directory's lock for this tier's life: a second server on the same
        directory (two shared one unnoticed: one's clear-cache emptied the other's index
        underneath it, and together they passed their size cap) gets its tier off, with the
        one error, instead."""
        fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BlockingIOError(errno.EWOULDBLOCK, "another process (another ultrakv server) uses this "
                                  "directory; give each server a --kv-disk-dir of its own") from None
        self._lock_file = fd

    # -- index ------------------------------------------------------------------------------

    def _scan(self) -> None:
        for path in self.directory.iterdir():
            if path.name.endswith(TMP_SUFFIX):  # a write the last process did not finish
                path.unlink(missing_ok=True)
                continue
            if not path.name.endswith(SUFFIX):
                continue
            try:
                block_hash = int(path.name[: -len(SUFFIX)], 16)
            except ValueError:
                continue
            if path.stat().st_size not in self._file_sizes:
                log.warning("disk tier: %s has the wrong size (truncated); removed", path)
                path.unlink(missing_ok=True)
                continue
            self._index.add(block_hash)
            self.policy.on_insert(block_hash)
            self.policy.set_evictable(block_hash, True)
        while len(self._index) > self.capacity:
            self._evict_one()
        log.info("disk tier: %d blocks found in %s (capacity %d)", len(self._index),
                 self.directory, self.capacity)

    def __contains__(self, block_hash: int) -> bool:
        with self._lock:
            return self.enabled and block_hash in self._index

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    def _path(self, block_hash: int) -> str:
        return f"{self._prefix}{block_hash:016x}{SUFFIX}"

    # -- reads ------------------------------------------------------------------------------

    def read(self, block_hash: int) -> torch.Tensor | None:
        """The block as a new tensor, or None (see :meth:`read_into`)."""
        out = torch.empty(self.block_shape, dtype=self.dtype)
        return out if self.read_into(block_hash, out.view(torch.uint8).view(-1)) else None

    def read_into(self, block_hash: int, out: torch.Tensor) -> bool:
        """Read the block into ``out`` (a contiguous CPU uint8 tensor of ``block_bytes``);
        False when it is not here or its file fails its checks (the file is then removed, the
        caller recomputes the block, and ``out`` holds garbage). Safe on any thread."""
        with self._lock:
            if not self.enabled or block_hash not in self._index:
                return False
            self.policy.on_hit(block_hash)
        path = self._path(block_hash)
        key = self.key_of(block_hash)
        try:
            buffer = memoryview(out.numpy())
            if self._format.read_into(path, key, buffer):
                return True
            # Not this tier's current format byte for byte (a file of version 1, or damaged):
            # the general reader reads it, or says what is wrong with it.
            header = read_block_file_into(Path(path), buffer, expect_key=key)
            if header.shape != self.block_shape or header.dtype != self._dtype_name:
                raise BlockFileError(f"block must be {list(self.block_shape)} {self._dtype_name}, "
                                     f"got {list(header.shape)} {header.dtype}")
            return True
        except FileNotFoundError:  # evicted by the writer since the lookup
            with self._lock:
                self._forget(block_hash)
            return False
        except (OSError, BlockFileError) as exc:
            log.warning("disk tier: %s dropped, its block will be recomputed: %s", path, exc)
            with self._lock:
                self.corrupted += 1
                self._forget(block_hash)
            _unlink(path)
            return False

    # -- writes -----------------------------------------------------------------------------

    def submit(self, block_hash: int, block: torch.Tensor, ready: torch.cuda.Event | None = None,
               done: Callable[[], None] | None = None) -> bool:
        """Queue a CPU block to be written; False when it was dropped (the tier is off or its
        queue is full) or the block is already here. The block's memory is the writer's until
        ``done`` is called (on the writer thread, once written or dropped there; never when
        this returns False); its bytes are read once ``ready`` (a CUDA event) has completed."""
        with self._lock:
            if not self.enabled:
                self.dropped += 1
                return False
            if block_hash in self._index:
                self.policy.on_hit(block_hash)
                return False
        try:
            self._queue.put_nowait(_Write(block_hash, block, ready, done))
        except queue.Full:
            with self._lock:
                self.dropped += 1
            return False
        return True

    def write_now(self, block_hash: int, block: torch.Tensor) -> bool:
        """Write a block on the calling thread (the shutdown flush); False when not written."""
        with self._lock:
            if not self.enabled or block_hash in self._index:
                return False
        return self._write(block_hash, block)

    def flush(self) -> None:
        """Wait until every queued block is written (or dropped)."""
        if self._writer is not None and self._writer.is_alive():
            self._queue.join()

    def full(self) -> bool:
        """Whether a :meth:`submit` now would be dropped for want of room in the queue."""
        return self._queue.full()

    def room(self) -> int:
        """How many blocks the queue takes now (none while the tier is off)."""
        return max(0, self.queue_blocks - self._queue.qsize()) if self.enabled else 0

    def drop(self, n: int) -> None:
        """Count ``n`` blocks dropped without being submitted (no room for them)."""
        if n:
            with self._lock:
                self.dropped += n

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if item.ready is not None:
                    item.ready.synchronize()
                self._write(item.block_hash, item.block)
            except Exception:  # the writer must outlive any one block
                log.exception("disk tier: writing block %016x failed", item.block_hash)
            finally:
                if item is not None and item.done is not None:
                    item.done()
                self._queue.task_done()

    def _write(self, block_hash: int, block: torch.Tensor) -> bool:
        with self._lock:
            if not self.enabled:
                self.dropped += 1
                return False
            if block_hash in self._index:
                return False
            while len(self._index) >= self.capacity:
                self._evict_one()
        if block.nbytes != self.block_bytes:  # the header written is this tier's block's
            raise ValueError(f"a block must be {self.block_bytes} bytes, got {block.nbytes}")
        try:
            payload = memoryview(block.contiguous().view(torch.uint8).view(-1).numpy())
            write_atomic(self._path(block_hash), self._format.parts(self.key_of(block_hash), payload), fsync=False)
        except OSError as exc:
            self._disable(f"writing {self._path(block_hash)} failed", exc)
            return False
        with self._lock:
            if not self.enabled:
                return False
            self._index.add(block_hash)
            self.policy.on_insert(block_hash)
            self.policy.set_evictable(block_hash, True)
            self.writes += 1
        self._notify("stored", block_hash)
        return True

    def _evict_one(self) -> None:
        """Remove the policy's victim (under the lock)."""
        victim = self.policy.victim()
        if victim is None:
            return
        self._index.discard(victim)
        self.evictions += 1
        _unlink(self._path(victim))
        self._notify("removed", victim)

    def _forget(self, block_hash: int) -> None:
        if block_hash in self._index:
            self._index.discard(block_hash)
            self.policy.discard(block_hash)
            self._notify("removed", block_hash)

    def _notify(self, event: str, block_hash: int) -> None:
        if self.observer is not None:
            self.observer(event, block_hash)

    def _disable(self, what: str, exc: OSError) -> None:
        """Turn the tier off for good, with the one error a full or read-only disk logs."""
        with self._lock:
            if not self.enabled:
                return
            self.enabled = False
            for block_hash in list(self._index):
                self._forget(block_hash)
        log.error("disk tier off (the node serves on without it): %s: %s", what, exc)

    def hashes(self) -> list[int]:
        """Every block hash indexed (none while the tier is off)."""
        with self._lock:
            return list(self._index) if self.enabled else []

    def clear(self) -> int:
        """Remove every block file; returns how many were indexed."""
        self.flush()
        with self._lock:
            hashes = list(self._index)
            for block_hash in hashes:
                self._forget(block_hash)
                _unlink(self._path(block_hash))
        return len(hashes)

    def close(self) -> None:
        """Finish queued writes, stop the writer thread, let the directory go."""
        if self._writer is not None and self._writer.is_alive():
            self._queue.put(None)
            self._writer.join(timeout=60)
        if self._lock_file is not None:
            os.close(self._lock_file)  # releases the lock
            self._lock_file = None


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
