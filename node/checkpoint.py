"""A node's checkpointer: writes its sessions every interval in the cluster's checkpoint
format (cluster/checkpoint.py) and records the manifest in etcd; restores them at start.

Growth is bounded: only sessions that changed are written (files and manifest entries),
etcd's key history is compacted after manifest writes, and the checkpoint directory keeps
within ``max_bytes``: over it, the coldest sessions lose their KV file first (their KV is
recomputed if they ever come back from the checkpoint), and if histories alone still do
not fit, the coldest sessions are left out (their replica still holds them).

Each session's history file carries the record of its last turn from the node's turn ledger
(node/turn_ledger.py), so whichever node restores it answers a retry of that turn from the
record instead of taking the turn again."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ultrakv.cluster.checkpoint import (
    CheckpointEntry,
    Manifest,
    compact_history,
    load_manifest,
    read_session,
    write_manifest,
    write_session,
)
from ultrakv.cluster.errors import EngineError, SessionNotFoundError
from ultrakv.cluster.session_state import LastTurn, SessionState
from ultrakv.cluster.store import EtcdStore, EtcdUnavailableError
from ultrakv.cluster.tasks import cancel_task
from ultrakv.cluster.validation import RequestRejected
from ultrakv.node.turn_ledger import TurnLedger, TurnRecord

log = logging.getLogger("ultrakv.node.checkpoint")

DEFAULT_MAX_BYTES = 4 << 30
# etcd history kept behind the head when compacting: enough for a watcher that is a little
# behind to resume, far less than what a day of checkpoint rounds would pile up.
KEEP_REVISIONS = 1000


def fit_budget(entries: dict[str, CheckpointEntry], sizes: dict[str, tuple[int, int]],
               coldest_first: list[str], max_bytes: int) -> dict[str, CheckpointEntry]:
    """The entries to record within ``max_bytes`` (pure). ``sizes``: session -> (history
    bytes, KV bytes). The coldest sessions lose their KV file first; if histories alone
    still exceed the budget, the coldest sessions are left out."""
    total = sum(h + k for h, k in sizes.values())
    kept = dict(entries)
    for sid in coldest_first:
        if total <= max_bytes:
            return kept
        if kept[sid].kv_file:
            kept[sid] = replace(kept[sid], kv_file="", kv_sha256="", kv_tokens=0)
            total -= sizes[sid][1]
    for sid in coldest_first:
        if total <= max_bytes:
            break
        del kept[sid]
        total -= sizes[sid][0]
    return kept


@dataclass
class RestoreReport:
    """What :func:`restore_into` did."""

    restored: list[str] = field(default_factory=list)
    kv_tokens: int = 0
    kv_recomputed: list[str] = field(default_factory=list)  # KV file missing or corrupted
    lost: list[str] = field(default_factory=list)  # history file missing or corrupted
    replicas: list[str] = field(default_factory=list)  # restored as replicas, history only
    # Restored sessions and replicas whose last turn's record came back too (history only):
    # the node's turn ledger adopts them.
    last_turns: list[SessionState] = field(default_factory=list)


def restore_into(engine, manifest: Manifest, skip: set[str] = frozenset()) -> RestoreReport:
    """Import every checkpointed session (except ``skip``) into ``engine`` (blocking);
    replicas come back as replicas."""
    report = RestoreReport()
    directory = Path(manifest.directory)
    for sid, entry in manifest.sessions.items():
        if sid in skip:
            continue
        state = read_session(directory, entry)
        if state is None:
            report.lost.append(sid)
            continue
        if state.last_turn is not None:
            report.last_turns.append(replace(state, kv=None, kv_tokens=0))
        if entry.replica:
            engine.store_replica(sid, state.token_ids, state.turns, state.tenant, state.messages)
            report.replicas.append(sid)
            continue
        if entry.kv_file and state.kv is None:
            report.kv_recomputed.append(sid)
        if state.kv is not None and state.model_fingerprint != engine.model_fingerprint:
            state = replace(state, kv=None, kv_tokens=0)
        try:
            report.kv_tokens += engine.import_session(state)
        except (EngineError, RequestRejected) as exc:  # e.g. an id outside the vocabulary
            log.warning("session %s not restored: %s", sid, exc)
            report.lost.append(sid)
            continue
        report.restored.append(sid)
    return report


class Checkpointer:
    """Writes this node's sessions every ``interval_s`` and records the manifest in etcd."""

    def __init__(self, engine, node_id: str, directory: str | Path, store: EtcdStore,
                 interval_s: float = 10.0, max_bytes: int = DEFAULT_MAX_BYTES,
                 ledger: TurnLedger | None = None) -> None:
        """``ledger``: the node's turn ledger, whose records of the sessions' last turns go
        into their history files."""
        if not interval_s > 0:
            raise ValueError(f"checkpoint interval_s must be > 0, got {interval_s}")
        if max_bytes < 1:
            raise ValueError(f"checkpoint max_bytes must be >= 1, got {max_bytes}")
        self.max_bytes = max_bytes
        self.engine = engine
        self.node_id = node_id
        self.directory = Path(directory) / node_id
        self.store = store
        self.interval_s = interval_s
        self.ledger = ledger
        self.manifest = Manifest(node_id, str(self.directory.resolve()))
        self.recorded: Manifest | None = None  # what etcd holds (None: unknown, write all)
        self._task: asyncio.Task[None] | None = None
        self._round = asyncio.Lock()  # a round and a deleted session's removal, one at a time
        self._last_compacted = 0.0
        # The key of the turn record written with each session's files (None: none): a
        # record that reached the ledger after its history was written (the turn landed
        # while a round ran) gets the files rewritten, though turns and tokens are unchanged.
        self._written_records: dict[str, tuple | None] = {}

    def _write(self, records: dict[str, TurnRecord]) -> Manifest:
        """Write what changed since the last manifest, with the sessions' last turns'
        ``records``; returns the new manifest (blocking).

        Replicas are written too: a session created since its owner's last checkpoint may
        have its replica here as its only copy.
        """
        previous = self.manifest.sessions
        entries: dict[str, CheckpointEntry] = {}
        written: dict[str, tuple | None] = {}
        infos = sorted(self.engine.list_sessions(), key=lambda i: i.last_used_at)
        for info in infos:
            sid = info.session_id
            old = previous.get(sid)
            done = records.get(sid)
            wanted = done.key if done is not None and done.turns == info.turns else None
            if old is not None and (old.turns, old.num_tokens, old.replica) == (
                    info.turns, info.num_tokens, info.replica) and (
                    wanted is None or self._written_records.get(sid) == wanted):
                entries[sid] = old
                written[sid] = self._written_records.get(sid)
                continue
            try:
                state = self.engine.export_session(sid)
            except SessionNotFoundError:
                continue  # removed since listed
            written[sid] = None
            if done is not None and done.turns == state.turns:
                state = replace(state, last_turn=LastTurn(done.result, done.key[2]))
                written[sid] = done.key
            entries[sid] = replace(write_session(self.directory, state), replica=info.replica)
        self._written_records = written
        fitted = fit_budget(entries, {sid: self._sizes(e) for sid, e in entries.items()},
                            [i.session_id for i in infos if i.session_id in entries],
                            self.max_bytes)
        if len(fitted) < len(entries):
            log.warning("checkpoint of %s over its %d-byte budget: %d coldest sessions left "
                        "out", self.node_id, self.max_bytes, len(entries) - len(fitted))
        return Manifest(self.node_id, str(self.directory.resolve()), time.time(), fitted)

    def restored(self, manifest: Manifest, session_ids: list[str]) -> None:
        """The manifest this node restored from, and the sessions whose files held the turn
        record the ledger now has for them (adopted first): those files need no rewrite."""
        self.manifest = self.recorded = manifest
        records = self.ledger.records() if self.ledger is not None else {}
        self._written_records = {sid: records[sid].key for sid in session_ids if sid in records}

    def _sizes(self, entry: CheckpointEntry) -> tuple[int, int]:
        def size(name: str) -> int:
            try:
                return (self.directory / name).stat().st_size if name else 0
            except OSError:
                return 0

        return size(entry.history_file), size(entry.kv_file)

    def _remove_unreferenced(self, manifest: Manifest) -> None:
        keep = {f for e in manifest.sessions.values() for f in (e.history_file, e.kv_file) if f}
        for path in self.directory.glob("*"):
            if path.name not in keep:
                path.unlink(missing_ok=True)

    async def forget(self, session_id: str) -> bool:
        """Drop a deleted session from the checkpoint now (its manifest entry in etcd, then its
        files), not at the next round: a node restarted or restored from it meanwhile would
        bring the session back. False when the checkpoint did not hold it."""
        async with self._round:
            entries = dict(self.manifest.sessions)
            if entries.pop(session_id, None) is None:
                return False
            manifest = Manifest(self.node_id, str(self.directory.resolve()), time.time(), entries)
            if self.recorded is None:
                self.recorded = await load_manifest(self.store, self.node_id)
            await write_manifest(self.store, self.recorded, manifest)
            self.manifest = self.recorded = manifest
            await asyncio.to_thread(self._remove_unreferenced, manifest)
            return True

    async def checkpoint_once(self) -> Manifest:
        """One checkpoint: files first, then the changed manifest entries in etcd, then old
        files removed; etcd's history compacted at most once a minute."""
        async with self._round:
            return await self._checkpoint_once()

    async def _checkpoint_once(self) -> Manifest:
        # The ledger lives on this loop: its records are copied here, written in the thread.
        records = self.ledger.records() if self.ledger is not None else {}
        manifest = await asyncio.to_thread(self._write, records)
        self.manifest = manifest
        if self.recorded is None:  # entries a previous run left in etcd are replaced too
            self.recorded = await load_manifest(self.store, self.node_id)
        await write_manifest(self.store, self.recorded, manifest)
        self.recorded = manifest
        await asyncio.to_thread(self._remove_unreferenced, manifest)
        if time.monotonic() - self._last_compacted >= 60.0:
            await compact_history(self.store, KEEP_REVISIONS)
            self._last_compacted = time.monotonic()
        return manifest

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.checkpoint_once()
            except EtcdUnavailableError as exc:
                # The files stay; the manifest is recorded on the next round.
                log.warning("checkpoint of %s not recorded: %s", self.node_id, exc)
            except Exception:
                log.exception("checkpoint of %s failed", self.node_id)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"checkpoint-{self.node_id}")

    async def stop(self) -> None:
        await cancel_task(self._task)
        self._task = None
