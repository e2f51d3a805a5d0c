"""The block file format shared by the disk tier, checkpoints and backups."""

from __future__ import annotations

import hashlib
import os
import struct
import sys
import threading

import pytest
import torch
from ultrakv.cluster.block_file import (
    BlockFileError,
    BlockFormat,
    BlockHeader,
    block_to_tensor,
    decode,
    encode,
    file_size,
    read_block_file,
    read_block_file_into,
    tensor_to_block,
    write_block_file,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    t = (torch.randn(3, 2, 4, 5) * 50).to(dtype)
    header, payload = tensor_to_block("fp/x/16/00ff", t)
    path = tmp_path / "b.kvb"
    size = write_block_file(path, header, payload)
    assert size == path.stat().st_size == file_size(header, t.numel() * t.element_size())
    assert not list(tmp_path.glob("*.tmp"))
    got_header, got_payload = read_block_file(path, expect_key="fp/x/16/00ff")
    assert got_header == BlockHeader("fp/x/16/00ff", (3, 2, 4, 5), str(dtype).removeprefix("torch."))
    back = block_to_tensor(got_header, got_payload)
    assert back.dtype == dtype and torch.equal(back.view(torch.uint8), t.view(torch.uint8))
    if os.name == "posix":
        assert path.stat().st_mode & 0o777 == 0o600


def test_every_flipped_byte_and_every_truncation_is_detected():
    data = encode(*tensor_to_block("k", torch.arange(24, dtype=torch.float32)))
    for i in range(0, len(data), 7):
        bad = bytearray(data)
        bad[i] ^= 0x40
        with pytest.raises(BlockFileError):
            decode(bytes(bad))
    for n in (0, 5, len(data) // 2, len(data) - 1):
        with pytest.raises(BlockFileError):
            decode(data[:n])
    with pytest.raises(BlockFileError, match="padded"):
        decode(data + b"\0")


def test_a_file_under_another_key_is_refused():
    data = encode(*tensor_to_block("a", torch.zeros(4)))
    with pytest.raises(BlockFileError, match="expected 'b'"):
        decode(data, expect_key="b")


def test_header_names_the_bad_field():
    with pytest.raises(BlockFileError, match="dtype must be one of"):
        BlockHeader("k", (1,), "complex64")
    header = BlockHeader("k", (2, 2), "float32")
    with pytest.raises(BlockFileError, match="payload must be 16 bytes"):
        block_to_tensor(header, b"\0" * 12)


def _version_1(header: BlockHeader, payload: bytes) -> bytes:
    """A block file as version 1 wrote it (sha256 trailer), built by hand."""
    head = header.to_json()
    body = b"".join((struct.pack("<4sHI", b"UKVB", 1, len(head)), head, struct.pack("<Q", len(payload)),
                     payload))
    return body + hashlib.sha256(body).digest()


def test_version_1_files_stay_readable_and_checked(tmp_path):
    """Checkpoints, backups and disk tiers written before the xxh3 checksum still load."""
    t = torch.arange(24, dtype=torch.float32)
    header, payload = tensor_to_block("k", t)
    old = _version_1(header, bytes(payload))
    assert len(old) == file_size(header, len(payload), version=1)
    got_header, got_payload = decode(old, expect_key="k")
    assert torch.equal(block_to_tensor(got_header, got_payload), t)
    path = tmp_path / "old.kvb"
    path.write_bytes(old)
    out = torch.empty(len(payload), dtype=torch.uint8)
    assert read_block_file_into(path, memoryview(out.numpy()), expect_key="k") == header
    assert torch.equal(out.view(torch.float32), t)
    bad = bytearray(old)
    bad[len(bad) // 2] ^= 0x01
    with pytest.raises(BlockFileError, match="sha256"):
        decode(bytes(bad))
    assert len(encode(header, payload)) == len(old) - 24  # new files: the 8-byte xxh3-64


def test_read_into_a_buffer_checks_like_decode(tmp_path):
    t = (torch.randn(2, 3, 4) * 10).to(torch.bfloat16)
    header, payload = tensor_to_block("blk", t)
    path = tmp_path / "b.kvb"
    write_block_file(path, header, payload, fsync=False)
    out = torch.empty(len(payload), dtype=torch.uint8)
    assert read_block_file_into(path, memoryview(out.numpy()), expect_key="blk") == header
    assert torch.equal(out, t.view(torch.uint8).reshape(-1))
    data = path.read_bytes()
    with pytest.raises(BlockFileError, match="expected 'other'"):
        read_block_file_into(path, memoryview(out.numpy()), expect_key="other")
    with pytest.raises(BlockFileError, match="padded"):  # a buffer of another block's size
        read_block_file_into(path, memoryview(torch.empty(8, dtype=torch.uint8).numpy()))
    for i in range(0, len(data), 11):  # every flipped byte: header, payload, lengths, checksum
        bad = bytearray(data)
        bad[i] ^= 0x20
        path.write_bytes(bytes(bad))
        with pytest.raises(BlockFileError):
            read_block_file_into(path, memoryview(out.numpy()), expect_key="blk")
    for n in (0, 7, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:n])
        with pytest.raises(BlockFileError):
            read_block_file_into(path, memoryview(out.numpy()), expect_key="blk")


def test_checksumming_a_block_lets_other_threads_run():
    """The disk tier's writer and readers checksum every block on their own threads; the
    engine thread must not wait for that. The payload's xxh3 runs with the GIL released
    (python-xxhash releases it for large updates), which this shows without timing: with the
    interpreter's switch interval at a minute, the main thread gets the GIL while a checksum
    is running only if the checksum gave it up."""
    from ultrakv.cluster import block_file

    block_file._digest(block_file.VERSION, (b"first",))  # imports xxhash now (imports do I/O)
    payload = memoryview(bytes(64 << 20))
    in_checksum = threading.Event()
    done = threading.Event()
    ran_meanwhile = []

    def checksum() -> None:
        in_checksum.set()  # the next statement is the checksum: no Python runs in between
        block_file._digest(block_file.VERSION, (b"front", payload))
        done.set()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(60.0)
    try:
        worker = threading.Thread(target=checksum)
        worker.start()
        in_checksum.wait(60)
        ran_meanwhile.append(not done.is_set())
        worker.join(60)
    finally:
        sys.setswitchinterval(interval)
    assert done.is_set() and ran_meanwhile == [True]


@pytest.mark.parametrize("key", ["k", "fp/bfloat16/16/00000000000000ff", 'odd "key" \\ é'])
def test_block_format_writes_what_encode_writes_and_reads_in_one_call(tmp_path, key):
    """The disk tier's per-block path (headers from bytes made once, one preadv per read)
    gives the files the general encoder gives, and refuses or hands back to the general
    reader whatever is not exactly its format."""
    t = (torch.randn(2, 3, 4) * 10).to(torch.bfloat16)
    header, payload = tensor_to_block(key, t)
    fmt = BlockFormat((2, 3, 4), "bfloat16", len(payload))
    parts = fmt.parts(key, payload)
    assert b"".join(bytes(p) for p in parts) == encode(header, payload)
    path = tmp_path / "b.kvb"
    from ultrakv.cluster.block_file import write_atomic

    write_atomic(str(path), parts, fsync=False)
    assert decode(path.read_bytes(), expect_key=key)[0] == header
    out = torch.empty(len(payload), dtype=torch.uint8)
    assert fmt.read_into(path, key, memoryview(out.numpy()))
    assert torch.equal(out, t.view(torch.uint8).reshape(-1))
    assert not fmt.read_into(path, key + "x", memoryview(out.numpy()))  # another key: not this format
    data = path.read_bytes()
    path.write_bytes(data + b"\0")  # padded
    assert not fmt.read_into(path, key, memoryview(out.numpy()))
    path.write_bytes(data[:-3])  # truncated
    assert not fmt.read_into(path, key, memoryview(out.numpy()))
    bad = bytearray(data)
    bad[len(parts[0]) + 5] ^= 0x20  # a payload byte
    path.write_bytes(bytes(bad))
    with pytest.raises(BlockFileError, match="checksum"):
        fmt.read_into(path, key, memoryview(out.numpy()))


def test_a_disk_tier_block_costs_few_system_calls_and_no_header_encoding(tmp_path, monkeypatch):
    """Per block, the disk tier's writer and readers take the GIL back after every system
    call (each take delays the engine thread): a write is open + one writev + close +
    rename, a read open + one preadv + close, with no JSON encoded or parsed."""
    from ultrakv.node.kv.disk_tier import DiskTier

    shape = (2, 2, 4, 2, 8)
    disk = DiskTier(tmp_path, "ns", lambda h: f"fp/bfloat16/4/{h:016x}", shape, torch.bfloat16, 1 << 30)
    disk.close()  # writes on this thread
    blocks = [torch.randn(shape).to(torch.bfloat16) for _ in range(3)]
    calls: dict[str, int] = {}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return wrapper

    for name in ("open", "write", "writev", "pread", "preadv", "fstat", "close", "replace"):
        monkeypatch.setattr(os, name, counted(name, getattr(os, name)))
    monkeypatch.setattr(BlockHeader, "to_json", counted("to_json", BlockHeader.to_json))
    monkeypatch.setattr(BlockHeader, "from_json", counted("from_json", BlockHeader.from_json))
    for h, block in enumerate(blocks):
        assert disk._write(h, block)
    assert calls == {"open": 3, "writev": 3, "close": 3, "replace": 3}
    calls.clear()
    out = torch.empty(disk.block_bytes, dtype=torch.uint8)
    for h, block in enumerate(blocks):
        assert disk.read_into(h, out)
        assert torch.equal(out, block.view(torch.uint8).reshape(-1))
    assert calls == {"open": 3, "preadv": 3, "close": 3}
