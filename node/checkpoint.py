"""A node's checkpointer: writes its sessions every interval in the cluster's checkpoint
format (cluster/checkpoint.py) and records the manifest in etcd; restores them at start."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ultrakv.cluster.checkpoint import (
    CheckpointEntry,
    Manifest,
    manifest_key,
    read_session,
    write_session,
)
from ultrakv.cluster.errors import EngineError, SessionNotFoundError
from ultrakv.cluster.store import EtcdStore, EtcdUnavailableError
from ultrakv.cluster.tasks import cancel_task
from ultrakv.cluster.validation import RequestRejected

log = logging.getLogger("ultrakv.node.checkpoint")


@dataclass
class RestoreReport:
    """What :func:`restore_into` did."""

    restored: list[str] = field(default_factory=list)
    kv_tokens: int = 0
    kv_recomputed: list[str] = field(default_factory=list)  # KV file missing or corrupted
    lost: list[str] = field(default_factory=list)  # history file missing or corrupted


def restore_into(engine, manifest: Manifest, skip: set[str] = frozenset()) -> RestoreReport:
    """Import every checkpointed session (except ``skip``) into ``engine`` (blocking)."""
    report = RestoreReport()
    directory = Path(manifest.directory)
    for sid, entry in manifest.sessions.items():
        if sid in skip:
            continue
        state = read_session(directory, entry)
        if state is None:
            report.lost.append(sid)
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
                 interval_s: float = 10.0) -> None:
        if not interval_s > 0:
            raise ValueError(f"checkpoint interval_s must be > 0, got {interval_s}")
        self.engine = engine
        self.node_id = node_id
        self.directory = Path(directory) / node_id
        self.store = store
        self.interval_s = interval_s
        self.manifest = Manifest(node_id, str(self.directory.resolve()))
        self._task: asyncio.Task[None] | None = None

    def _write(self) -> Manifest:
        """Write what changed since the last manifest; returns the new manifest (blocking)."""
        previous = self.manifest.sessions
        entries: dict[str, CheckpointEntry] = {}
        for info in self.engine.list_sessions():
            old = previous.get(info.session_id)
            if old is not None and (old.turns, old.num_tokens) == (info.turns, info.num_tokens):
                entries[info.session_id] = old
                continue
            try:
                state = self.engine.export_session(info.session_id)
            except SessionNotFoundError:
                continue  # removed since listed
            entries[info.session_id] = write_session(self.directory, state)
        return Manifest(self.node_id, str(self.directory.resolve()), time.time(), entries)

    def _remove_unreferenced(self, manifest: Manifest) -> None:
        keep = {f for e in manifest.sessions.values() for f in (e.history_file, e.kv_file) if f}
        for path in self.directory.glob("*"):
            if path.name not in keep:
                path.unlink(missing_ok=True)

    async def checkpoint_once(self) -> Manifest:
        """One checkpoint: files first, then the manifest in etcd, then old files removed."""
        manifest = await asyncio.to_thread(self._write)
        await self.store.put(manifest_key(self.node_id), manifest.to_json())
        self.manifest = manifest
        await asyncio.to_thread(self._remove_unreferenced, manifest)
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
