"""Backups on disk: what ``ultrakv backup create|list|verify|restore`` write and read.

A backup is a directory (or that directory as one ``.tar`` / ``.tar.zst`` file)::

    ultrakv-backup-20261123T212000.123Z/
      manifest.json        format version, created-at, the cut (the one point in time every
                           session is taken at), the cluster (nodes, models, fingerprint),
                           counts, one entry per session, sha256 + size per file
      manifest.sha256      the sha256 of manifest.json
      sessions/            every session in the checkpoint format (cluster/checkpoint.py):
                           <id>.t<turns>.n<tokens>.history.json and, with KV, .kv (a block
                           file, cluster/block_file.py: the disk tier's format)
      config.json          the coordinators' live config in etcd, when one was set
      checkpoints.json     the checkpoint manifests recorded in etcd at backup time

It is written under a temporary name and renamed whole, so a backup name never holds a
partial backup. The sessions come from the cluster's ``ExportSessions`` stream (admin key)
and go back through ``ImportSessions``; this module moves bytes only (no torch): the KV
files are block files, exactly as checkpoints write them. Every problem is a
:class:`BackupError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from ultrakv.cluster.block_file import BlockFileError, read_block_file
from ultrakv.cluster.checkpoint import CheckpointEntry, SessionRecord, encoded_last_turn, write_session_files
from ultrakv.cluster.session_transfer import (
    StateAssembler,
    TransferError,
    bytes_to_chunks,
    chat_messages,
    last_turn_of,
    message_pairs,
)
from ultrakv.v1 import node_pb2 as npb
from ultrakv.v1 import ultrakv_pb2

FORMAT = "ultrakv-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_SHA256 = "manifest.sha256"
SESSIONS = "sessions"
COMPRESSIONS = ("none", "zstd")
_NAME = re.compile(r"ultrakv-backup-(\d{8}T\d{6}\.\d{3}Z)(\.tar|\.tar\.zst)?")
_ARCHIVES = (".tar.zst", ".tar")


class BackupError(ValueError):
    """A backup that cannot be written, read or trusted; the message names the file."""


@dataclass
class BackupSettings:
    """The config file's ``backup`` section: where backups go and how often they run."""

    dir: str = "ultrakv-backups"
    schedule_s: float = 3600.0
    keep: int = 24
    compress: str = "zstd"
    history_only: bool = False

    def __post_init__(self) -> None:
        if not self.schedule_s > 0:
            raise ValueError(f"backup.schedule_s must be > 0, got {self.schedule_s}")
        if self.keep < 1:
            raise ValueError(f"backup.keep must be >= 1, got {self.keep}")
        if self.compress not in COMPRESSIONS:
            raise ValueError(f"backup.compress must be one of {COMPRESSIONS}, got {self.compress!r}")


@dataclass
class BackupManifest:
    """The top-level ``manifest.json``."""

    created_at: float
    history_only: bool
    nodes: list[dict]  # node_id, model, model_fingerprint
    sessions: list[CheckpointEntry]
    files: dict[str, dict]  # path inside the backup -> {"sha256", "bytes"}
    counts: dict[str, int] = field(default_factory=dict)
    # The cut: cut_id, taken_at (+ _utc), etcd_revision, hold_s, attempts, and turns (session
    # id -> its turns at the cut). None in a backup written before cuts.
    cut: dict | None = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def model_fingerprint(self) -> str:
        prints = sorted({n["model_fingerprint"] for n in self.nodes})
        return ",".join(prints)

    def to_json(self) -> bytes:
        d = asdict(self)
        d["created_at_utc"] = _stamp(self.created_at)
        d["model_fingerprint"] = self.model_fingerprint
        return json.dumps(d, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> BackupManifest:
        try:
            d = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BackupError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise BackupError(f"{where}: not an ultrakv backup manifest (format must be "
                              f"{FORMAT!r})")
        version = d.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise BackupError(f"{where}: format_version must be an integer >= 1, got {version!r}")
        if version > FORMAT_VERSION:
            raise BackupError(f"{where}: backup format version {version} is newer than this "
                              f"ultrakv reads (up to {FORMAT_VERSION}); restore it with a newer "
                              "ultrakv")
        try:
            cut = d.get("cut")
            return cls(float(d["created_at"]), bool(d["history_only"]), list(d["nodes"]),
                       [CheckpointEntry(**e) for e in d["sessions"]], dict(d["files"]),
                       dict(d.get("counts", {})), dict(cut) if cut is not None else None,
                       d["format"], version)
        except (KeyError, TypeError, ValueError) as exc:
            raise BackupError(f"{where}: malformed manifest ({exc!r})") from None


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y%m%dT%H%M%S.") + \
        f"{int(t * 1000) % 1000:03d}Z"


def backup_name(created_at: float) -> str:
    """The directory name of a backup made at ``created_at`` (sorts by time)."""
    return f"ultrakv-backup-{_stamp(created_at)}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- writing ---------------------------------------------------------------------------------


def _session_runs(parts: Iterator[ultrakv_pb2.BackupPart]
                  ) -> Iterator[tuple[npb.SessionHeader, bytes]]:
    assembler: StateAssembler | None = None
    for part in parts:
        if part.WhichOneof("part") != "session":
            raise BackupError("the backup stream holds a second header")
        if assembler is None:
            assembler = StateAssembler()
        assembler.add(part.session)
        if part.session.WhichOneof("part") == "trailer":
            yield assembler.finish_bytes()
            assembler = None
    if assembler is not None:
        raise BackupError("the backup stream ended inside a session (connection lost?)")


def write_backup(parts: Iterable[ultrakv_pb2.BackupPart], work: Path,
                 history_only: bool = False) -> BackupManifest:
    """Write the stream of ``ExportSessions`` into the empty directory ``work``: session
    files first (each chunk run checked: order, every sha256), then the manifest."""
    stream = iter(parts)
    first = next(stream, None)
    if first is None or first.WhichOneof("part") != "header":
        raise BackupError("the backup stream must start with a header")
    header = first.header
    extra: dict[str, bytes] = {}
    if header.config_json:
        extra["config.json"] = header.config_json.encode()
    if header.checkpoints_json:
        extra["checkpoints.json"] = header.checkpoints_json.encode()
    for name, data in extra.items():
        _write_private(work / name, data)
    sessions: list[CheckpointEntry] = []
    tenants: set[str] = set()
    try:
        for h, kv in _session_runs(stream):
            # The last turn's record goes with the history (node/turn_ledger.py): restored,
            # a retry of that turn is answered from it instead of being taken again.
            record = SessionRecord(h.session_id, list(h.token_ids), h.turns, h.tenant,
                                   h.model_fingerprint, h.kv_tokens, message_pairs(h.messages),
                                   *encoded_last_turn(last_turn_of(h)))
            sessions.append(write_session_files(work / SESSIONS, record, tuple(h.kv_shape),
                                                h.kv_dtype, kv) if h.kv_dtype else
                            write_session_files(work / SESSIONS, record))
            tenants.add(h.tenant)
    except (TransferError, BlockFileError) as exc:
        raise BackupError(f"the backup stream is corrupted: {exc}") from None
    if len(sessions) != header.num_sessions:
        raise BackupError(f"the backup stream announced {header.num_sessions} sessions but "
                          f"carried {len(sessions)}")
    files = {}
    for path in sorted(p for p in work.rglob("*") if p.is_file()):
        data = path.read_bytes()
        files[path.relative_to(work).as_posix()] = {"sha256": _sha256(data), "bytes": len(data)}
    manifest = BackupManifest(
        created_at=time.time(), history_only=history_only,
        nodes=[{"node_id": n.node_id, "model": n.model, "model_fingerprint": n.model_fingerprint}
               for n in header.nodes],
        sessions=sessions, files=files, cut=_cut_record(header.cut, sessions),
        counts={"sessions": len(sessions), "sessions_with_kv": sum(1 for e in sessions if e.kv_file),
                "tenants": len(tenants), "tokens": sum(e.num_tokens for e in sessions),
                "kv_tokens": sum(e.kv_tokens for e in sessions), "files": len(files),
                "bytes": sum(f["bytes"] for f in files.values())})
    raw = manifest.to_json()
    _write_private(work / MANIFEST, raw)
    _write_private(work / MANIFEST_SHA256, (_sha256(raw) + "\n").encode())
    return manifest


def _cut_record(cut: ultrakv_pb2.BackupCut, sessions: list[CheckpointEntry]) -> dict | None:
    """The manifest's ``cut``: the header's, with every session's turns at the cut."""
    if not cut.cut_id:
        return None
    return {"cut_id": cut.cut_id, "taken_at": cut.taken_at, "taken_at_utc": _stamp(cut.taken_at),
            "etcd_revision": cut.etcd_revision, "hold_s": cut.hold_s, "attempts": cut.attempts,
            "turns": {e.session_id: e.turns for e in sessions}}


def _write_private(path: Path, data: bytes) -> None:
    """``data`` to a new file only its owner may read (conversations are in plain text)."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(data)


def output_kind(output: Path, compress: str) -> str:
    """``dir`` (a folder that holds backups), ``tar`` or ``tar.zst`` (one file), from the
    ``--output`` name: a name ending .tar or .tar.zst is a file."""
    if compress not in COMPRESSIONS:
        raise BackupError(f"--compress must be one of {COMPRESSIONS}, got {compress!r}")
    name = output.name
    if name.endswith(".tar.zst"):
        return "tar.zst"
    if name.endswith(".tar"):
        if compress == "zstd":
            raise BackupError(f"{output}: --compress zstd writes a .tar.zst file, not .tar")
        return "tar"
    return "dir"


def save_backup(parts: Iterable[ultrakv_pb2.BackupPart], output: Path, compress: str = "none",
                history_only: bool = False) -> tuple[Path, BackupManifest]:
    """Write a backup from an ``ExportSessions`` stream to ``output`` (a folder of backups,
    or a .tar / .tar.zst file); returns where it went and its manifest."""
    kind = output_kind(output, compress)
    folder = output if kind == "dir" else output.parent
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".tmp-ultrakv-backup-", dir=folder))
    try:
        work.chmod(0o700)  # conversations in plain text: the owner's only
        manifest = write_backup(parts, work, history_only)
        name = backup_name(manifest.created_at)
        target = (folder / name if compress == "none" else folder / f"{name}.tar.zst") \
            if kind == "dir" else output
        if target.exists():  # never overwrite a backup (two in one millisecond, or --output)
            raise BackupError(f"{target}: already exists")
        if kind == "dir" and compress == "none":
            work.rename(target)
            return target, manifest
        zstd = target.name.endswith(".tar.zst")
        partial = target.with_name(f".tmp-{target.name}")
        _write_archive(work, name, partial, zstd)
        partial.rename(target)
        return target, manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_archive(work: Path, name: str, target: Path, zstd: bool) -> None:
    """``work`` as a tar (zstd-compressed when ``zstd``) with the manifest first, so
    ``list`` reads it without unpacking the rest."""
    import zstandard

    members = [work / MANIFEST, work / MANIFEST_SHA256] + sorted(
        p for p in work.rglob("*") if p.is_file() and p.name not in (MANIFEST, MANIFEST_SHA256))
    with os.fdopen(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as raw:
        sink = zstandard.ZstdCompressor(level=3).stream_writer(raw) if zstd else raw
        with tarfile.open(fileobj=sink, mode="w|") as tar:
            for path in members:
                tar.add(path, arcname=f"{name}/{path.relative_to(work).as_posix()}")
        if zstd:
            sink.close()


# --- reading and verifying -------------------------------------------------------------------


def _reader(path: Path):
    import zstandard

    f = open(path, "rb")
    if path.name.endswith(".tar.zst"):
        return zstandard.ZstdDecompressor().stream_reader(f, closefd=True)
    return f


@contextmanager
def opened(path: Path) -> Iterator[Path]:
    """The backup at ``path`` as a directory (an archive is unpacked into a temporary one
    for the duration)."""
    if not path.exists():
        raise BackupError(f"{path}: no such backup (neither a directory nor a file)")
    if path.is_dir():
        yield path
        return
    if not path.name.endswith(_ARCHIVES):
        raise BackupError(f"{path}: not a backup (a backup directory, .tar or .tar.zst file)")
    with tempfile.TemporaryDirectory(prefix=".ultrakv-restore-", dir=path.parent) as tmp:
        try:
            with _reader(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise BackupError(f"{path}: the archive is truncated or corrupted ({exc})") from None
        except Exception as exc:  # zstandard.ZstdError: the compressed stream is damaged
            if type(exc).__module__.startswith("zstandard"):
                raise BackupError(f"{path}: the archive is truncated or corrupted "
                                  f"({exc})") from None
            raise
        inner = [p for p in Path(tmp).iterdir() if p.is_dir()]
        if len(inner) != 1:
            raise BackupError(f"{path}: the archive must hold one backup directory, "
                              f"found {len(inner)}")
        yield inner[0]


def read_manifest(directory: Path, label: str) -> BackupManifest:
    """The manifest, checked against ``manifest.sha256``."""
    where = f"{label}/{MANIFEST}"
    try:
        raw = (directory / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise BackupError(f"{where}: missing: not an ultrakv backup") from None
    manifest = BackupManifest.from_json(raw, where)  # a newer format is named before a checksum
    try:
        expected = (directory / MANIFEST_SHA256).read_text().strip()
    except FileNotFoundError:
        raise BackupError(f"{label}/{MANIFEST_SHA256}: missing") from None
    if _sha256(raw) != expected:
        raise BackupError(f"{where}: sha256 mismatch (corrupted)")
    return manifest


def file_problems(directory: Path, manifest: BackupManifest, label: str) -> list[str]:
    """Every file the manifest names that is missing, truncated, grown or corrupted."""
    problems = []
    for name, expect in sorted(manifest.files.items()):
        path = directory / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            problems.append(f"{label}/{name}: missing")
            continue
        if len(data) < expect["bytes"]:
            problems.append(f"{label}/{name}: truncated ({len(data)} bytes, the manifest says "
                            f"{expect['bytes']})")
        elif len(data) > expect["bytes"]:
            problems.append(f"{label}/{name}: {len(data)} bytes, the manifest says "
                            f"{expect['bytes']} (altered)")
        elif _sha256(data) != expect["sha256"]:
            problems.append(f"{label}/{name}: sha256 mismatch (corrupted)")
    named = {f for e in manifest.sessions for f in (e.history_file, e.kv_file) if f}
    for f in sorted(named - {n.removeprefix(SESSIONS + "/") for n in manifest.files}):
        problems.append(f"{label}/{SESSIONS}/{f}: a session file the manifest lists no sha256 for")
    return problems


def verify(path: Path) -> BackupManifest:
    """Check a backup whole: manifest, format version, every file's size and sha256.
    Raises BackupError listing every problem found."""
    with opened(path) as directory:
        manifest = read_manifest(directory, str(path))
        problems = file_problems(directory, manifest, str(path))
    if problems:
        raise BackupError(f"{path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return manifest


def session_chunks(directory: Path, manifest: BackupManifest) -> Iterator[npb.SessionChunk]:
    """Every session of a verified backup as ``ImportSessions`` wants it: chunk runs."""
    for entry in manifest.sessions:
        path = directory / SESSIONS / entry.history_file
        try:
            record = SessionRecord.from_json(path.read_bytes())
        except ValueError as exc:
            raise BackupError(f"{path}: {exc}") from None
        header = npb.SessionHeader(
            session_id=record.session_id, token_ids=record.token_ids, turns=record.turns,
            model_fingerprint=record.model_fingerprint, tenant=record.tenant,
            messages=chat_messages(record.messages))
        if (last := record.last_turn()) is not None:
            header.last_result.CopyFrom(last.result)
            header.last_digest = last.digest
        payload: bytes | memoryview = b""
        if entry.kv_file:
            path = directory / SESSIONS / entry.kv_file
            try:
                block, payload = read_block_file(path, expect_key=entry.kv_file)
            except BlockFileError as exc:
                raise BackupError(f"{path}: {exc}") from None
            header.kv_tokens = record.kv_tokens
            header.kv_shape.extend(block.shape)
            header.kv_dtype = block.dtype
        yield from bytes_to_chunks(header, bytes(payload))


def unpack(path: Path, output: Path) -> Path:
    """Verify the backup at ``path`` and copy it out as a plain directory under ``output``."""
    verify(path)
    with opened(path) as directory:
        target = output / directory.name.removesuffix(".tar.zst").removesuffix(".tar")
        if target.exists():
            raise BackupError(f"{target}: already exists")
        output.mkdir(parents=True, exist_ok=True)
        shutil.copytree(directory, target)
    return target


# --- the backups of a folder: listing and retention -------------------------------------------


@dataclass(frozen=True)
class BackupListing:
    """One backup of a folder, from its manifest (None: unreadable, with ``problem``)."""

    path: Path
    manifest: BackupManifest | None
    problem: str = ""


def backups_in(folder: Path) -> list[Path]:
    """The backups of ``folder`` by name, oldest first (the names sort by time)."""
    if not folder.is_dir():
        raise BackupError(f"{folder}: no such backup folder")
    return sorted((p for p in folder.iterdir() if _NAME.fullmatch(p.name)), key=lambda p: p.name)


def _archive_manifest(path: Path) -> BackupManifest:
    """The manifest of an archive, read from its first member (written first)."""
    try:
        with _reader(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            member = tar.next()
            if member is None or not member.name.endswith("/" + MANIFEST):
                raise BackupError(f"{path}: the archive does not start with {MANIFEST}")
            f = tar.extractfile(member)
            return BackupManifest.from_json(f.read() if f else b"", f"{path}/{MANIFEST}")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BackupError(f"{path}: the archive is truncated or corrupted ({exc})") from None


def list_backups(folder: Path) -> list[BackupListing]:
    """Every backup of ``folder``, oldest first; a damaged one is listed with its problem."""
    out = []
    for path in backups_in(folder):
        try:
            manifest = (_archive_manifest(path) if path.is_file()
                        else read_manifest(path, str(path)))
            out.append(BackupListing(path, manifest))
        except BackupError as exc:
            out.append(BackupListing(path, None, str(exc)))
        except Exception as exc:  # a damaged zstd frame
            out.append(BackupListing(path, None, f"{path}: unreadable ({exc})"))
    return out


def expired(names: list[str], keep: int) -> list[str]:
    """The backups to delete so that the newest ``keep`` remain (pure; names sort by time)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    return sorted(names)[:-keep] if len(names) > keep else []


def prune(folder: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` backups of ``folder``; returns what went."""
    gone = []
    by_name = {p.name: p for p in backups_in(folder)}
    for name in expired(list(by_name), keep):
        path = by_name[name]
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        gone.append(path)
    return gone


def manifest_summary(manifest: BackupManifest) -> dict:
    """The figures ``backup list`` / ``create`` print."""
    cut = {"cut_at": manifest.cut["taken_at_utc"]} if manifest.cut else {}
    return {"created_at": _stamp(manifest.created_at), **cut, **manifest.counts,
            "history_only": manifest.history_only,
            "model_fingerprint": manifest.model_fingerprint,
            "format_version": manifest.format_version}
