"""API keys: random secrets handed out once, stored only as SHA-256 hashes in a keys file,
each bound to a tenant and a role.

A key reads ``ukv_<id>_<secret>``: the id (12 hex digits) finds the record, the hash of the
whole key is compared in constant time. The secret has 256 bits, so a plain SHA-256 is as
strong as a slow hash here (slow hashes protect guessable passwords, not random keys).

The keys file holds one JSON record per line (``ultrakv keys create`` appends, ``revoke``
rewrites it), mode 0600. A key created with ``--signing`` also stores the secret its
requests are signed with (signing.py): the server must know that one to check signatures.
:class:`KeyStore` re-reads the file when its mtime changes (checked at most once a second)
or on ``reload()`` (SIGHUP), so keys are added and revoked without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ultrakv.cluster.security.principal import Role

log = logging.getLogger("ultrakv.security.keys")

KEY_PREFIX = "ukv_"
_KEY_RE = re.compile(r"ukv_([0-9a-f]{12})_[A-Za-z0-9_-]{20,}")
_TENANT_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
RELOAD_CHECK_INTERVAL_S = 1.0


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id_of(key: str) -> str | None:
    """The id part of a well-formed key, else None."""
    match = _KEY_RE.fullmatch(key)
    return match.group(1) if match else None


def validate_tenant(tenant: str) -> str:
    if not _TENANT_RE.fullmatch(tenant):
        raise ValueError(f"tenant must be 1..128 characters of [A-Za-z0-9._-], got {tenant!r}")
    return tenant


@dataclass(frozen=True)
class KeyRecord:
    """One line of the keys file: never the key itself."""

    key_id: str
    key_hash: str
    tenant: str
    role: str
    created_at: float
    signing_secret: str = ""  # set: every request with this key must be signed

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> KeyRecord:
        data = json.loads(line)
        record = cls(**data)
        Role.parse(record.role)
        validate_tenant(record.tenant)
        return record


def new_key() -> tuple[str, str]:
    """A fresh (key, key id)."""
    key_id = secrets.token_hex(6)
    return f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}", key_id


def read_keys_file(path: str | Path) -> list[KeyRecord]:
    """Every record of the keys file; a malformed line is an error naming the line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                records.append(KeyRecord.from_json(line))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: not a key record ({exc})") from None
    return records


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with ``text``, readable by its owner only."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def create_key(path: str | Path, tenant: str, role: str = "user",
               signing: bool = False) -> tuple[str, KeyRecord]:
    """Append a new key's record to the keys file (created 0600 if absent); returns the key
    (shown once, never stored) and its record."""
    validate_tenant(tenant)
    Role.parse(role)
    path = Path(path)
    existing = read_keys_file(path) if path.exists() else []
    key, key_id = new_key()
    record = KeyRecord(key_id=key_id, key_hash=hash_key(key), tenant=tenant, role=role,
                       created_at=time.time(),
                       signing_secret=secrets.token_urlsafe(32) if signing else "")
    lines = [r.to_json() for r in existing] + [record.to_json()]
    _write_private(path, "\n".join(lines) + "\n")
    return key, record


def revoke_key(path: str | Path, key_id: str) -> KeyRecord:
    """Remove the record of ``key_id`` (or of the full key given) from the keys file."""
    key_id = key_id_of(key_id) or key_id
    path = Path(path)
    records = read_keys_file(path)
    gone = [r for r in records if r.key_id == key_id]
    if not gone:
        raise LookupError(f"key id {key_id!r} is not in {path}")
    _write_private(path, "".join(r.to_json() + "\n" for r in records if r.key_id != key_id))
    return gone[0]


class KeyStore:
    """The keys of a keys file, looked up in constant time; reloads when the file changes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._records: dict[str, KeyRecord] = {}
        self._mtime_ns = -1
        self._checked_at = 0.0
        self._lock = threading.Lock()
        self.reload()

    def __len__(self) -> int:
        return len(self._records)

    def reload(self) -> None:
        """Read the file now. A broken file keeps the keys last read (and logs why), so a
        half-edited file never locks everyone out; a missing one at start is an error."""
        try:
            mtime = self.path.stat().st_mtime_ns
            records = {r.key_id: r for r in read_keys_file(self.path)}
        except (OSError, ValueError) as exc:
            if self._mtime_ns < 0:
                raise ValueError(f"keys_file {self.path} could not be read: {exc}") from exc
            log.error("keys file %s not reloaded, keeping %d keys: %s", self.path,
                      len(self._records), exc)
            return
        with self._lock:
            changed = self._mtime_ns >= 0 and mtime != self._mtime_ns
            self._records, self._mtime_ns = records, mtime
        if changed:
            log.info("keys file %s reloaded: %d keys", self.path, len(records))

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < RELOAD_CHECK_INTERVAL_S:
            return
        self._checked_at = now
        try:
            if self.path.stat().st_mtime_ns != self._mtime_ns:
                self.reload()
        except OSError as exc:
            log.error("keys file %s unreadable, keeping %d keys: %s", self.path,
                      len(self._records), exc)

    def lookup(self, key: str) -> KeyRecord | None:
        """The record of ``key``, or None. The hash comparison runs whatever the id."""
        self._maybe_reload()
        key_id = key_id_of(key)
        record = self._records.get(key_id) if key_id else None
        expected = record.key_hash if record is not None else hash_key("")
        ok = hmac.compare_digest(hash_key(key), expected)
        return record if ok and record is not None else None
