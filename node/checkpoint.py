"""Session checkpoints: history and KV files with sha256, the manifest recorded in etcd.

Every ``interval_s`` a node writes each session that changed since the last checkpoint as
two files under ``<directory>/<node id>/``: the history (JSON) and the KV of its cached
leading blocks (raw tensor bytes). File names carry the turn count, so a new version never
overwrites the one the current manifest points at. Once the files are on disk the manifest
(``checkpoints/<node id>``: every session's files and their sha256) is written to etcd in
one put, which is atomic; files no manifest names any more are removed afterwards. A crash
at any point leaves the previous manifest and its files intact.

On load every file is checked against its sha256. A KV file that is missing or corrupted
is logged and dropped: the session comes back with its history only and the engine
recomputes the KV on the next turn. A corrupted history file drops the session from the
checkpoint (the caller falls back to the replicated history). Never a crash, never KV that
does not belong to the history it is served with.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from ultrakv.coordinator.store import EtcdStore, EtcdUnavailableError
from ultrakv.coordinator.tasks import cancel_task
from ultrakv.node.errors import SessionNotFoundError
from ultrakv.node.outputs import SessionState

log = logging.getLogger("ultrakv.node.checkpoint")

CHECKPOINTS_PREFIX = "checkpoints/"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def manifest_key(node_id: str) -> str:
    """The etcd key (relative to the store prefix) of ``node_id``'s manifest."""
    return CHECKPOINTS_PREFIX + node_id


@dataclass(frozen=True)
class CheckpointEntry:
    """One session in a manifest: its two files and their sha256 (hex)."""

    session_id: str
    turns: int
    num_tokens: int
    history_file: str
    history_sha256: str
    kv_file: str = ""  # "" when the session had no cached block
    kv_sha256: str = ""
    kv_tokens: int = 0


@dataclass
class Manifest:
    """What one checkpoint holds; ``directory`` is where its files are."""

    node_id: str
    directory: str
    created_at: float = field(default_factory=time.time)
    sessions: dict[str, CheckpointEntry] = field(default_factory=dict)

    def to_json(self) -> bytes:
        d = asdict(self)
        d["sessions"] = [asdict(e) for e in self.sessions.values()]
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse the stored form; ValueError on a malformed manifest."""
        try:
            d = json.loads(data)
            entries = [CheckpointEntry(**e) for e in d["sessions"]]
            return cls(d["node_id"], d["directory"], float(d["created_at"]),
                       {e.session_id: e for e in entries})
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"malformed checkpoint manifest: {exc!r}") from exc


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_session(directory: Path, state: SessionState) -> CheckpointEntry:
    """Write ``state``'s history and KV files into ``directory``; returns the entry."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{state.session_id}.t{state.turns}.n{len(state.token_ids)}"
    kv = state.kv if state.kv is not None and state.kv_tokens > 0 else None
    history = json.dumps({
        "session_id": state.session_id, "token_ids": state.token_ids, "turns": state.turns,
        "tenant": state.tenant, "model_fingerprint": state.model_fingerprint,
        "kv_tokens": state.kv_tokens if kv is not None else 0,
        "kv_shape": list(kv.shape) if kv is not None else [],
        "kv_dtype": str(kv.dtype).removeprefix("torch.") if kv is not None else "",
    }).encode()
    entry = CheckpointEntry(state.session_id, state.turns, len(state.token_ids),
                            stem + ".history.json", _sha256(history))
    _write_atomic(directory / entry.history_file, history)
    if kv is not None:
        data = kv.contiguous().view(torch.uint8).numpy().tobytes()
        entry = replace(entry, kv_file=stem + ".kv", kv_sha256=_sha256(data),
                        kv_tokens=state.kv_tokens)
        _write_atomic(directory / entry.kv_file, data)
    return entry


def _read_verified(path: Path, sha256: str) -> bytes | None:
    try:
        data = path.read_bytes()
    except OSError as exc:
        log.error("checkpoint file %s unreadable (%s)", path, exc)
        return None
    if _sha256(data) != sha256:
        log.error("checkpoint file %s fails its sha256 check (corrupted)", path)
        return None
    return data


def read_session(directory: Path, entry: CheckpointEntry) -> SessionState | None:
    """The session of ``entry``, checked against its sha256s.

    None when the history file is missing or corrupted; the state without KV when only the
    KV file is (the engine then recomputes the KV from the history).
    """
    raw = _read_verified(directory / entry.history_file, entry.history_sha256)
    if raw is None:
        return None
    h = json.loads(raw)
    state = SessionState(session_id=h["session_id"], token_ids=list(h["token_ids"]),
                         turns=int(h["turns"]), model_fingerprint=h["model_fingerprint"],
                         tenant=h.get("tenant", ""))
    if not entry.kv_file:
        return state
    data = _read_verified(directory / entry.kv_file, entry.kv_sha256)
    if data is None:
        log.warning("session %s: KV will be recomputed from its history", entry.session_id)
        return state
    dtype = _DTYPES[h["kv_dtype"]]
    kv = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(h["kv_shape"])
    return replace(state, kv=kv, kv_tokens=int(h["kv_tokens"]))


def merge_with_history(session_id: str, checkpointed: SessionState | None, history: list[int],
                       turns: int, fingerprint: str) -> SessionState:
    """The session to restore from a checkpoint and a replicated history of the same session.

    The longer of the two histories wins when one extends the other (the checkpoint's KV
    stays valid: it covers a prefix of it); when they diverge the replicated history wins,
    being what clients were acknowledged, and the KV is dropped.
    """
    if checkpointed is None:
        return SessionState(session_id, list(history), turns, fingerprint)
    ckpt = checkpointed.token_ids
    if len(history) >= len(ckpt) and history[:len(ckpt)] == ckpt:
        return replace(checkpointed, token_ids=list(history), turns=max(turns, checkpointed.turns))
    if len(ckpt) > len(history) and ckpt[:len(history)] == history:
        return checkpointed
    return replace(checkpointed, token_ids=list(history), turns=turns, kv=None, kv_tokens=0)


async def load_manifest(store: EtcdStore, node_id: str) -> Manifest | None:
    """``node_id``'s last recorded manifest, or None."""
    kv = await store.get(manifest_key(node_id))
    if kv is None:
        return None
    try:
        return Manifest.from_json(kv.value)
    except ValueError as exc:
        log.error("ignoring the checkpoint manifest of %s: %s", node_id, exc)
        return None


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
        report.kv_tokens += engine.import_session(state)
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
