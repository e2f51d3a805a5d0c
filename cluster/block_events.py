"""Block events: where a node's cached blocks live, as it tells its coordinators.

A node numbers the changes of its cache tiers (block content hashes stored in a tier or
removed from it) consecutively within an *epoch*, a fresh id at each process start. A
coordinator subscribes (``NodeService.BlockEvents``) with the epoch and the last sequence
number it applied; the node answers with the changes since then, or with a snapshot of what
it holds when it cannot continue (another epoch: it restarted; a number older than the
changes it keeps). Every message is checked here on both sides: each list and string has a
cap, and an error names the field and the limit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import grpc
from ultrakv.cluster.validation import RequestRejected
from ultrakv.v1 import node_pb2 as npb

TIERS = ("gpu", "cpu", "disk")  # fastest first
MAX_EVENTS_PER_MESSAGE = 1024
MAX_HASHES_PER_EVENT = 4096
MAX_EPOCH_CHARS = 64
MAX_BLOCK_SIZE = 1 << 16


@dataclass(frozen=True)
class BlockEvent:
    """One change of one tier: ``hashes`` became reusable in ``tier`` (``stored``) or left it.
    ``seq`` numbers the node's changes from 1; it is 0 in a snapshot, which is state."""

    seq: int
    stored: bool
    tier: str
    hashes: tuple[int, ...]


@dataclass(frozen=True)
class BlockEventBatch:
    """One message of a node's stream: changes, or a part of a snapshot taken at ``seq``
    (``reset`` on its first part: what was known of the node before is void)."""

    epoch: str
    seq: int
    block_size: int
    events: tuple[BlockEvent, ...]
    snapshot: bool = False
    reset: bool = False
    chain_root: int | None = None  # the parent of every chain's first block (kv dtype)

    @property
    def last_seq(self) -> int:
        """The sequence number a subscriber has applied after this message."""
        if self.snapshot or not self.events:
            return self.seq
        return self.events[-1].seq


def _invalid(field: str, message: str) -> RequestRejected:
    return RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, field, message)


def validate_epoch(epoch: str, field: str = "epoch") -> str:
    """An epoch as sent: at most MAX_EPOCH_CHARS characters ("" = none known yet)."""
    if len(epoch) > MAX_EPOCH_CHARS:
        raise _invalid(field, f"{field} must be at most {MAX_EPOCH_CHARS} characters, "
                              f"got {len(epoch)}")
    return epoch


def batch_to_message(batch: BlockEventBatch) -> npb.BlockEventsMessage:
    """The wire form of ``batch``."""
    return npb.BlockEventsMessage(
        epoch=batch.epoch, snapshot=batch.snapshot, reset=batch.reset, seq=batch.seq,
        block_size=batch.block_size, chain_root=batch.chain_root,
        events=[npb.BlockEvent(seq=e.seq, stored=e.stored, tier=e.tier, hashes=e.hashes)
                for e in batch.events])


def batch_from_message(message: npb.BlockEventsMessage) -> BlockEventBatch:
    """Check a received message against the caps and return it as a batch; raises
    :class:`RequestRejected` naming the field and the limit."""
    validate_epoch(message.epoch)
    if not message.epoch:
        raise _invalid("epoch", "epoch must be non-empty")
    if not 1 <= message.block_size <= MAX_BLOCK_SIZE:
        raise _invalid("block_size", f"block_size must be in [1, {MAX_BLOCK_SIZE}], "
                                     f"got {message.block_size}")
    if len(message.events) > MAX_EVENTS_PER_MESSAGE:
        raise _invalid("events", f"events must hold at most {MAX_EVENTS_PER_MESSAGE} per "
                                 f"message, got {len(message.events)}")
    events = []
    for i, e in enumerate(message.events):
        if e.tier not in TIERS:
            raise _invalid(f"events[{i}].tier", f"events[{i}].tier must be one of "
                                                f"{', '.join(TIERS)}, got {e.tier[:32]!r}")
        if len(e.hashes) > MAX_HASHES_PER_EVENT:
            raise _invalid(f"events[{i}].hashes", f"events[{i}].hashes must hold at most "
                                                  f"{MAX_HASHES_PER_EVENT}, got {len(e.hashes)}")
        if message.snapshot and (e.seq or not e.stored):
            raise _invalid(f"events[{i}]", f"events[{i}] of a snapshot must be stored blocks "
                                           "with seq 0")
        events.append(BlockEvent(e.seq, e.stored, e.tier, tuple(e.hashes)))
    if message.reset and not message.snapshot:
        raise _invalid("reset", "reset must come with snapshot")
    return BlockEventBatch(message.epoch, message.seq, message.block_size, tuple(events),
                           message.snapshot, message.reset,
                           message.chain_root if message.HasField("chain_root") else None)


def chunked(hashes: Iterable[int]) -> Iterator[tuple[int, ...]]:
    """``hashes`` in runs of at most MAX_HASHES_PER_EVENT."""
    run: list[int] = []
    for h in hashes:
        run.append(h)
        if len(run) == MAX_HASHES_PER_EVENT:
            yield tuple(run)
            run = []
    if run:
        yield tuple(run)


def snapshot_batches(epoch: str, seq: int, block_size: int, chain_root: int | None,
                     held: Mapping[str, Iterable[int]]) -> list[BlockEventBatch]:
    """What a node holds (tier -> hashes) at ``seq``, as snapshot messages within the caps;
    always at least one (the first resets, even when nothing is held)."""
    events = [BlockEvent(0, True, tier, run) for tier in TIERS for run in chunked(held.get(tier, ()))]
    parts = [tuple(events[i:i + MAX_EVENTS_PER_MESSAGE])
             for i in range(0, len(events), MAX_EVENTS_PER_MESSAGE)] or [()]
    return [BlockEventBatch(epoch, seq, block_size, part, snapshot=True, reset=i == 0,
                            chain_root=chain_root)
            for i, part in enumerate(parts)]


def delta_batches(epoch: str, block_size: int, chain_root: int | None,
                  events: list[BlockEvent]) -> list[BlockEventBatch]:
    """Changes as messages within the caps (each event already within MAX_HASHES_PER_EVENT)."""
    return [BlockEventBatch(epoch, events[min(i + MAX_EVENTS_PER_MESSAGE, len(events)) - 1].seq,
                            block_size, tuple(events[i:i + MAX_EVENTS_PER_MESSAGE]),
                            chain_root=chain_root)
            for i in range(0, len(events), MAX_EVENTS_PER_MESSAGE)]
