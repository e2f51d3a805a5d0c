"""The one file format for KV on disk: the node's disk tier (one file per block), session
checkpoints (one file per session's KV) and backups all write and read it.

Layout (little-endian)::

    magic b"UKVB" | version u16 | header length u32 | header (UTF-8 JSON)
    | payload length u64 | payload | checksum of everything before it

The checksum is version 2's xxh3-64 (8 bytes): a flipped bit or a cut file gets past it with
odds of 2^-64, and it runs at ~40 GB/s where the sha256 of version 1 (32 bytes) ran at ~1
GB/s and was most of a disk-tier hit's cost (benchmarks/profile_disk_tier.py). It guards
against damage, not against an attacker (who could rewrite either digest): checkpoints and
backups keep a sha256 per file in their manifests for that. Files of version 1 stay readable (:func:`decode` and
:func:`read_block_file_into` check either digest); new files are written as version 2.

The header is a :class:`BlockHeader`: ``key`` (what the payload is, e.g. a block's identity
"<model fingerprint>/<kv dtype>/<block size>/<chained hash>", or a checkpoint's file stem),
the tensor's ``shape`` and ``dtype`` (a torch dtype name). The payload is the tensor's bytes
in C order, so a block's layers lie next to each other and one read brings back all of them.
The trailing checksum covers header and payload: a flipped bit or a truncated file is found
on read (:class:`BlockFileError`) and never served. :func:`read_block_file_into` reads a
file's payload straight into the caller's buffer (one ``preadv``, no copy in between): the
disk tier's path into a (pinned) staging buffer. :func:`write_block_file` writes a temp file
in the same directory, fsyncs it and renames it over the target, so a reader sees the old
file or the new one, never half of one.

Only the standard library loads at import (coordinators and client commands use this module
for checkpoints and backups); xxhash loads with the first checksum, torch inside
:func:`tensor_to_block` and :func:`block_to_tensor`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MAGIC = b"UKVB"
VERSION = 2  # the version written; 1 (sha256) is still read
SUFFIX = ".kvb"
TMP_SUFFIX = ".tmp"
DTYPES = ("float32", "float16", "bfloat16", "float8_e4m3fn", "int8", "uint8")
_PREFIX = struct.Struct("<4sHI")  # magic, version, header length
_LEN = struct.Struct("<Q")
_DIGEST_BYTES = {1: 32, 2: 8}  # per version: sha256, xxh3-64 (little-endian u64)
MAX_HEADER_BYTES = 1 << 16


class BlockFileError(ValueError):
    """A block file that is not one, is truncated, or fails its checksum."""


@dataclass(frozen=True)
class BlockHeader:
    """What a block file's payload holds: ``key`` names it, ``shape`` and ``dtype`` (a torch
    dtype name) describe its tensor."""

    key: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise BlockFileError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if any(not isinstance(d, int) or d < 0 for d in self.shape):
            raise BlockFileError(f"shape must be non-negative ints, got {self.shape!r}")

    def to_json(self) -> bytes:
        return json.dumps({"key": self.key, "shape": list(self.shape), "dtype": self.dtype},
                          sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> BlockHeader:
        try:
            d = json.loads(raw)
            return cls(str(d["key"]), tuple(int(x) for x in d["shape"]), str(d["dtype"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise BlockFileError(f"malformed block header: {exc!r}") from None


def _digest(version: int, parts: Sequence[bytes | memoryview]) -> bytes:
    """The checksum of ``parts`` (one after the other) that a file of ``version`` ends with."""
    if version == 1:
        h = hashlib.sha256()
    else:
        import xxhash  # here: importing this module loads the standard library only

        h = xxhash.xxh3_64()
    for part in parts:
        h.update(part)
    return h.digest() if version == 1 else h.intdigest().to_bytes(8, "little")


def encode(header: BlockHeader, payload: bytes | memoryview) -> bytes:
    """The bytes of a block file holding ``payload`` under ``header``."""
    return b"".join(encode_parts(header, payload))


def encode_parts(header: BlockHeader, payload: bytes | memoryview) -> list[bytes | memoryview]:
    """A block file as three pieces (what precedes the payload, the payload itself, the
    checksum), so a writer can write them one after the other without first copying the
    payload into one buffer (the disk tier's writer: that copy held the GIL)."""
    head = header.to_json()
    front = _PREFIX.pack(MAGIC, VERSION, len(head)) + head + _LEN.pack(len(payload))
    return [front, payload, _digest(VERSION, (front, payload))]


def file_size(header: BlockHeader, payload_bytes: int, version: int = VERSION) -> int:
    """The size of a file of ``version`` (:func:`encode` writes the current one) holding
    ``payload_bytes`` under ``header``: a scan spots truncated files by it."""
    return _PREFIX.size + len(header.to_json()) + _LEN.size + payload_bytes + _DIGEST_BYTES[version]


def _check_prefix(view: memoryview, size: int) -> tuple[int, int]:
    """Version and header length from a file's first bytes (``size``: the whole file's)."""
    magic, version, head_len = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise BlockFileError(f"not a block file (magic {bytes(magic)!r})")
    if version not in _DIGEST_BYTES:
        raise BlockFileError(f"block file version must be one of {sorted(_DIGEST_BYTES)}, got {version}")
    if head_len > MAX_HEADER_BYTES:
        raise BlockFileError(f"block header must be at most {MAX_HEADER_BYTES} bytes, got {head_len}")
    if size < _PREFIX.size + head_len + _LEN.size + _DIGEST_BYTES[version]:
        raise BlockFileError(f"block file truncated: {size} bytes")
    return version, head_len


def decode(data: bytes | memoryview, expect_key: str | None = None) -> tuple[BlockHeader, memoryview]:
    """Header and payload of a block file's bytes; BlockFileError when the magic, version,
    lengths or checksum do not hold, or the key is not ``expect_key`` (when given)."""
    view = memoryview(data)
    if len(view) < _PREFIX.size:
        raise BlockFileError(f"block file truncated: {len(view)} bytes")
    version, head_len = _check_prefix(view, len(view))
    at = _PREFIX.size + head_len
    (payload_len,) = _LEN.unpack_from(view, at)
    end = at + _LEN.size + payload_len
    digest = _DIGEST_BYTES[version]
    if len(view) != end + digest:
        raise BlockFileError(f"block file truncated or padded: {len(view)} bytes, "
                             f"expected {end + digest}")
    _verify(version, (view[:end],), view[end:])
    return _header(view[_PREFIX.size:at], expect_key), view[at + _LEN.size:end]


def _verify(version: int, parts: Sequence[bytes | memoryview], digest: bytes | memoryview) -> None:
    if _digest(version, parts) != bytes(digest):
        raise BlockFileError(f"block file fails its checksum ({'sha256' if version == 1 else 'xxh3-64'}): "
                             "corrupted")


def _header(raw: bytes | memoryview, expect_key: str | None) -> BlockHeader:
    header = BlockHeader.from_json(bytes(raw))
    if expect_key is not None and header.key != expect_key:
        raise BlockFileError(f"block file holds key {header.key!r}, expected {expect_key!r}")
    return header


def read_block_file_into(path: Path, out: memoryview, expect_key: str | None = None) -> BlockHeader:
    """Read the block file at ``path``, whose payload must be exactly ``len(out)`` bytes,
    with its payload going straight into ``out`` (a writable byte buffer: a staging slot),
    and check it (see :func:`decode`). On BlockFileError ``out`` holds garbage: the caller
    must not use it. OSError when the file cannot be read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        prefix = os.pread(fd, _PREFIX.size, 0)
        if len(prefix) < _PREFIX.size:
            raise BlockFileError(f"block file truncated: {size} bytes")
        version, head_len = _check_prefix(memoryview(prefix), size)
        head = bytearray(head_len + _LEN.size)
        digest = bytearray(_DIGEST_BYTES[version])
        if size != _PREFIX.size + len(head) + len(out) + len(digest):
            raise BlockFileError(f"block file truncated or padded: {size} bytes, expected "
                                 f"{_PREFIX.size + len(head) + len(out) + len(digest)}")
        # One system call for the rest; the payload lands in ``out`` with no copy in between.
        got = os.preadv(fd, [head, out, digest], _PREFIX.size)
    finally:
        os.close(fd)
    if got != size - _PREFIX.size:
        raise BlockFileError(f"block file truncated while read: {got + _PREFIX.size} of {size} bytes")
    (payload_len,) = _LEN.unpack_from(head, head_len)
    if payload_len != len(out):
        raise BlockFileError(f"block payload must be {len(out)} bytes, got {payload_len}")
    _verify(version, (prefix, head, out), digest)
    return _header(memoryview(head)[:head_len], expect_key)


class BlockFormat:
    """Block files of one ``shape`` and ``dtype`` whose keys differ, as the disk tier writes
    them by the thousand: everything before the payload is built from bytes made once (no
    JSON encoding per block), and :meth:`read_into` checks a file in one ``preadv`` with
    no header parsing. Writes the same bytes as :func:`encode` (current version)."""

    _PLACEHOLDER = "\x00key\x00"

    def __init__(self, shape: Sequence[int], dtype: str, payload_bytes: int) -> None:
        head = BlockHeader(self._PLACEHOLDER, tuple(shape), dtype).to_json()
        self._pre, self._post = head.split(json.dumps(self._PLACEHOLDER).encode())
        self.payload_bytes = payload_bytes

    def front(self, key: str) -> bytes:
        """What precedes the payload in the file of ``key`` (see :func:`encode_parts`)."""
        head = self._pre + json.dumps(key).encode() + self._post
        return _PREFIX.pack(MAGIC, VERSION, len(head)) + head + _LEN.pack(self.payload_bytes)

    def parts(self, key: str, payload: bytes | memoryview) -> list[bytes | memoryview]:
        """The file of ``key`` holding ``payload``, as :func:`encode_parts` gives it."""
        front = self.front(key)
        return [front, payload, _digest(VERSION, (front, payload))]

    def read_into(self, path: str | Path, key: str, out: memoryview) -> bool:
        """Read the file of ``key`` at ``path``, its payload straight into ``out``, in one
        ``preadv`` (no ``fstat``, no header parsing: its first bytes must be exactly
        :meth:`front`'s); True when it checks out. False when the file is not in this
        format (another version, header or size: :func:`read_block_file_into` then reads
        it, and explains what is wrong with it); BlockFileError when its checksum fails
        (``out`` then holds garbage); OSError when it cannot be read."""
        front = self.front(key)
        got_front, digest = bytearray(len(front)), bytearray(_DIGEST_BYTES[VERSION])
        beyond = bytearray(1)  # a byte past the expected end: a longer file is not this format
        fd = os.open(path, os.O_RDONLY)
        try:
            got = os.preadv(fd, [got_front, out, digest, beyond], 0)
        finally:
            os.close(fd)
        if got != len(front) + len(out) + len(digest) or got_front != front:
            return False
        _verify(VERSION, (got_front, out), digest)
        return True


def write_block_file(path: Path, header: BlockHeader, payload: bytes | memoryview,
                     fsync: bool = True) -> int:
    """Write a block file at ``path`` atomically (see :func:`write_atomic`); returns its size."""
    parts = encode_parts(header, payload)
    write_atomic(path, parts, fsync)
    return sum(len(p) for p in parts)


def write_atomic(path: str | Path, data: bytes | Sequence[bytes | memoryview], fsync: bool = True) -> None:
    """Write ``data`` (or its pieces, one after the other) as ``path`` all at once (temp
    file, fsync, rename), readable by its owner only (KV and histories can be turned back
    into the conversation). OSError (disk full, read-only directory) propagates; the temp
    file is removed then.

    The pieces go in one ``writev`` (the disk tier's writer thread takes the GIL back after
    every system call, and each take delays the engine thread: see
    benchmarks/profile_disk_engine_cost.py)."""
    path = os.fspath(path)
    tmp = path + TMP_SUFFIX
    parts = [data] if isinstance(data, bytes | bytearray | memoryview) else data
    views = [v for v in (memoryview(part).cast("B") for part in parts) if v.nbytes]
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            while views:  # a write may take less than all
                written = os.writev(fd, views)
                while views and written >= views[0].nbytes:
                    written -= views.pop(0).nbytes
                if views:
                    views[0] = views[0][written:]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_block_file(path: Path, expect_key: str | None = None) -> tuple[BlockHeader, memoryview]:
    """Read and check a block file (see :func:`decode`); OSError when it cannot be read."""
    return decode(path.read_bytes(), expect_key)


def tensor_to_block(key: str, tensor: torch.Tensor) -> tuple[BlockHeader, memoryview]:
    """A header and the payload bytes of a CPU tensor (made contiguous)."""
    import torch

    t = tensor.detach().contiguous()
    header = BlockHeader(key, tuple(t.shape), str(t.dtype).removeprefix("torch."))
    return header, memoryview(t.view(torch.uint8).reshape(-1).numpy())


def block_to_tensor(header: BlockHeader, payload: bytes | memoryview) -> torch.Tensor:
    """The tensor a block file holds (a CPU tensor over a private copy of the bytes)."""
    import torch

    dtype = getattr(torch, header.dtype)
    expected = dtype.itemsize
    for d in header.shape:
        expected *= d
    if len(payload) != expected:
        raise BlockFileError(f"payload must be {expected} bytes for shape {list(header.shape)} "
                             f"{header.dtype}, got {len(payload)}")
    if not expected:
        return torch.empty(header.shape, dtype=dtype)
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype).reshape(header.shape)
