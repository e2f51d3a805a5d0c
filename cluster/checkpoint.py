"""The checkpoint format shared by nodes (which write it) and coordinators (which restore a
dead node's sessions from it).

Every ``interval_s`` a node writes each session that changed since the last checkpoint as
two files under ``<directory>/<node id>/``: the history (JSON) and the KV of its cached
leading blocks (a block file, cluster/block_file.py: the disk tier's format, with the
tensor's shape and dtype in its header and a sha256 of its own). File names carry the turn count, so a new version never
overwrites the one the current manifest points at. Once the files are on disk the manifest
is updated in etcd: ``checkpoints/<node id>`` holds where the files are, and
``checkpoints/<node id>/<session id>`` one entry per session (its files and their sha256),
so a round writes only the sessions that changed and deletes the ones that are gone.
Files no entry names any more are removed afterwards. Every entry is valid on its own, so a
crash at any point leaves each session at its previous or its new checkpoint, never a mix.

A history file also holds the record of the session's last turn, when its node had it
(node/turn_ledger.py): a session restored from a checkpoint answers a retry of that turn
from it, as a moved one does.

On load every file is checked against its sha256. A KV file that is missing or corrupted
is logged and dropped: the session comes back with its history only and the engine
recomputes the KV on the next turn. A corrupted history file drops the session from the
checkpoint (the caller falls back to the replicated history). Never a crash, never KV that
does not belong to the history it is served with.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ultrakv.cluster.block_file import (
    BlockFileError,
    BlockHeader,
    block_to_tensor,
    decode,
    encode,
    tensor_to_block,
    write_atomic,
)
from ultrakv.cluster.session_state import LastTurn, SessionState
from ultrakv.cluster.store import Delete, EtcdStore, Put, StoreError
from ultrakv.v1 import types_pb2 as pb

log = logging.getLogger("ultrakv.cluster.checkpoint")

CHECKPOINTS_PREFIX = "checkpoints/"
_TXN_OPS = 100  # etcd refuses transactions of more than 128 operations by default


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
    replica: bool = False  # a replica the node held for the session's owner


@dataclass
class Manifest:
    """What one checkpoint holds; ``directory`` is where its files are."""

    node_id: str
    directory: str
    created_at: float = field(default_factory=time.time)
    sessions: dict[str, CheckpointEntry] = field(default_factory=dict)

    def header_json(self) -> bytes:
        """The stored header: everything but the entries (each has a key of its own)."""
        return json.dumps({"node_id": self.node_id, "directory": self.directory,
                           "created_at": self.created_at}, sort_keys=True).encode()

    @classmethod
    def from_stored(cls, header: bytes, entries: list[bytes]) -> Manifest:
        """Parse the stored header and entries; ValueError on a malformed one."""
        try:
            d = json.loads(header)
            parsed = [CheckpointEntry(**json.loads(e)) for e in entries]
            return cls(d["node_id"], d["directory"], float(d["created_at"]),
                       {e.session_id: e for e in parsed})
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"malformed checkpoint manifest: {exc!r}") from exc


def _entry_json(entry: CheckpointEntry) -> bytes:
    return json.dumps(asdict(entry), sort_keys=True).encode()


def manifest_changes(old: Manifest | None, new: Manifest) -> list[Put | Delete]:
    """The etcd writes that turn stored manifest ``old`` into ``new`` (pure): the header
    when it is new or moved, each changed or added entry, a delete per dropped one."""
    key = manifest_key(new.node_id)
    ops: list[Put | Delete] = []
    if old is None or old.directory != new.directory:
        ops.append(Put(key, new.header_json()))
    before = old.sessions if old is not None else {}
    for sid, entry in new.sessions.items():
        if before.get(sid) != entry:
            ops.append(Put(f"{key}/{sid}", _entry_json(entry)))
    ops.extend(Delete(f"{key}/{sid}") for sid in before if sid not in new.sessions)
    return ops


async def write_manifest(store: EtcdStore, old: Manifest | None, new: Manifest) -> int:
    """Write what changed from ``old`` (what etcd holds, None: nothing) to ``new``;
    returns how many keys were written or deleted."""
    ops = manifest_changes(old, new)
    for i in range(0, len(ops), _TXN_OPS):
        await store.txn([], ops[i:i + _TXN_OPS])
    return len(ops)


async def compact_history(store: EtcdStore, keep_revisions: int) -> None:
    """Compact etcd's key history up to ``keep_revisions`` before the current revision:
    superseded manifest entries no longer pile up between etcd's own compactions, and
    watchers a little behind can still resume."""
    target = await store.current_revision() - keep_revisions
    if target <= 0:
        return
    try:
        await store.compact(target)
    except StoreError as exc:  # already compacted there (by etcd or another node): fine
        log.debug("compaction to revision %d skipped: %s", target, exc)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class SessionRecord:
    """What a history file holds (the KV's shape and dtype are in its block file)."""

    session_id: str
    token_ids: list[int]
    turns: int
    tenant: str
    model_fingerprint: str
    kv_tokens: int = 0
    messages: list[tuple[str, str]] = field(default_factory=list)  # chat: (role, content)
    # The last turn's record: its GenerateResult (serialized, base64) and digest (hex); "" = none.
    last_result: str = ""
    last_digest: str = ""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> SessionRecord:
        """Parse a history file; ValueError naming what is wrong."""
        try:
            h = json.loads(raw)
            return cls(str(h["session_id"]), [int(t) for t in h["token_ids"]], int(h["turns"]),
                       str(h.get("tenant", "")), str(h["model_fingerprint"]),
                       int(h.get("kv_tokens", 0)),
                       [(str(r), str(c)) for r, c in h.get("messages", [])],
                       str(h.get("last_result", "")), str(h.get("last_digest", "")))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"malformed session history: {exc!r}") from exc

    def last_turn(self) -> LastTurn | None:
        """The last turn's record, or None (none written, or unreadable: it is only ever
        an answer to a retry, and the history stands without it)."""
        if not self.last_result:
            return None
        try:
            result = pb.GenerateResult.FromString(base64.b64decode(self.last_result, validate=True))
            digest = bytes.fromhex(self.last_digest)
        except (binascii.Error, ValueError) as exc:  # DecodeError is a ValueError
            log.error("session %s: its last turn's record is unreadable (%s)", self.session_id, exc)
            return None
        return LastTurn(result, digest)


def encoded_last_turn(last: LastTurn | None) -> tuple[str, str]:
    """A last turn's record as a history file holds it (:class:`SessionRecord`'s
    ``last_result`` and ``last_digest``); empty strings for none."""
    if last is None:
        return "", ""
    return base64.b64encode(last.result.SerializeToString()).decode(), last.digest.hex()


def write_session(directory: Path, state: SessionState) -> CheckpointEntry:
    """Write ``state``'s history and KV files into ``directory``; returns the entry."""
    kv = state.kv if state.kv is not None and state.kv_tokens > 0 else None
    record = SessionRecord(state.session_id, state.token_ids, state.turns, state.tenant,
                           state.model_fingerprint, state.kv_tokens if kv is not None else 0,
                           state.messages, *encoded_last_turn(state.last_turn))
    if kv is None:
        return write_session_files(directory, record)
    header, payload = tensor_to_block("", kv.cpu())  # the key is the file name, set below
    return write_session_files(directory, record, header.shape, header.dtype, payload)


# A file name holds at most 255 bytes; a session key (cluster/session_keys.py) up to 257.
_NAMED_AS_IS_MAX_BYTES = 128


def _file_name_of(session_id: str) -> str:
    """The start of a session's file names: its id, or for a long key its digest behind a
    "~" (which starts no id or key, so it names no other session)."""
    if len(session_id.encode("utf-8")) <= _NAMED_AS_IS_MAX_BYTES:
        return session_id
    return "~" + hashlib.sha256(session_id.encode("utf-8")).hexdigest()


def write_session_files(directory: Path, record: SessionRecord, kv_shape: tuple[int, ...] = (),
                        kv_dtype: str = "", kv: bytes | memoryview | None = None
                        ) -> CheckpointEntry:
    """Write ``record`` as a history file and, given ``kv`` (the raw bytes of a tensor of
    ``kv_shape`` and ``kv_dtype``), a KV block file into ``directory``; returns the entry.
    Needs no torch: backups write sessions they receive as bytes."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    stem = f"{_file_name_of(record.session_id)}.t{record.turns}.n{len(record.token_ids)}"
    if kv is None:
        record = replace(record, kv_tokens=0)
    history = record.to_json()
    entry = CheckpointEntry(record.session_id, record.turns, len(record.token_ids),
                            stem + ".history.json", _sha256(history))
    write_atomic(directory / entry.history_file, history)
    if kv is not None:
        kv_file = stem + ".kv"
        data = encode(BlockHeader(kv_file, tuple(kv_shape), kv_dtype), kv)
        write_atomic(directory / kv_file, data)
        entry = replace(entry, kv_file=kv_file, kv_sha256=_sha256(data), kv_tokens=record.kv_tokens)
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
    h = SessionRecord.from_json(raw)
    state = SessionState(session_id=h.session_id, token_ids=h.token_ids, turns=h.turns,
                         model_fingerprint=h.model_fingerprint, tenant=h.tenant,
                         messages=h.messages, last_turn=h.last_turn())
    if not entry.kv_file:
        return state
    data = _read_verified(directory / entry.kv_file, entry.kv_sha256)
    kv = None
    if data is not None:
        try:
            kv = block_to_tensor(*decode(data, expect_key=entry.kv_file))
        except BlockFileError as exc:
            log.error("checkpoint file %s is not a valid block file (%s)",
                      directory / entry.kv_file, exc)
    if kv is None:
        log.warning("session %s: KV will be recomputed from its history", entry.session_id)
        return state
    return replace(state, kv=kv, kv_tokens=h.kv_tokens)


def merge_with_history(session_id: str, checkpointed: SessionState | None, history: list[int],
                       turns: int, fingerprint: str,
                       messages: list[tuple[str, str]] | None = None) -> SessionState:
    """The session to restore from a checkpoint and a replicated history of the same session.

    The copy with more turns wins, never the longer one: a checkpoint may be older than the
    replica (written before the last turns) or newer (the replica lagged). On equal turns
    the replicated history wins, being what clients were acknowledged. The checkpoint's KV
    is kept while it covers a prefix of the winning history, dropped otherwise. The chat
    ``messages`` (of the replicated history) go with the history they belong to.
    """
    messages = list(messages or [])
    if checkpointed is None:
        return SessionState(session_id, list(history), turns, fingerprint, messages=messages)
    if checkpointed.turns > turns:
        return checkpointed
    kv_tokens = checkpointed.kv_tokens if checkpointed.kv is not None else 0
    merged = replace(checkpointed, token_ids=list(history), turns=turns, messages=messages)
    if history[:kv_tokens] != checkpointed.token_ids[:kv_tokens] or len(history) < kv_tokens:
        merged = replace(merged, kv=None, kv_tokens=0)
    return merged


async def load_manifest(store: EtcdStore, node_id: str) -> Manifest | None:
    """``node_id``'s last recorded manifest (header and entries read at one revision), or
    None."""
    key = manifest_key(node_id)
    kvs, _ = await store.get_prefix(key)
    header = next((kv.value for kv in kvs if kv.key == key), None)
    if header is None:
        return None
    try:
        return Manifest.from_stored(header, [kv.value for kv in kvs
                                             if kv.key.startswith(key + "/")])
    except ValueError as exc:
        log.error("ignoring the checkpoint manifest of %s: %s", node_id, exc)
        return None


