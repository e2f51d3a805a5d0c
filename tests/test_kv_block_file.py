"""The block file format shared by the disk tier, checkpoints and backups."""

from __future__ import annotations

import os

import pytest
import torch
from ultrakv.cluster.block_file import (
    BlockFileError,
    BlockHeader,
    block_to_tensor,
    decode,
    encode,
    file_size,
    read_block_file,
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
