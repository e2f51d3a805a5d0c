"""Chained content hashes of full KV blocks.

A full block's hash covers its parent block's hash, its token ids and the tenant salt, so
two sequences share a block only when their whole prefixes up to and including that block
are equal under the same salt. The hash is blake2b over a fixed byte layout (never Python's
``hash()``, which is salted per process): a hash computed on one node means the same on every
other node and after a restart, which session migration and checkpoints rely on.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence


def hash_block(parent: int | None, token_ids: Sequence[int], salt: str = "") -> int:
    """Hash one block: an unsigned 64-bit int from ``parent``, ``token_ids`` and ``salt``.

    ``parent`` is the hash of the previous block, or None for the first block of a sequence.
    Layout (little-endian): a parent flag byte and 8 parent bytes, the salt's UTF-8 length (4
    bytes) and bytes, then each token id as a signed 64-bit int. Length prefixes keep
    different (salt, tokens) splits from colliding byte for byte.
    """
    return _digest(_parent_field(parent) + _salt_field(salt) + _packed(token_ids))


def hash_token_blocks(
    token_ids: Sequence[int], block_size: int, salt: str = "", parent: int | None = None
) -> list[int]:
    """Chained hashes of every FULL block of ``token_ids`` (a trailing partial block has none).

    ``parent`` continues a chain: pass the hash of the block just before ``token_ids`` to hash
    the blocks of a continuation without rehashing the prefix.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    num_blocks = len(token_ids) // block_size
    if num_blocks == 0:
        return []
    # The tokens packed in one call and the salt's bytes built once: every turn of a
    # conversation hashes its new blocks before its prefill can start (the same bytes as
    # hash_block's, block by block).
    head, salt_field = _parent_field(parent), _salt_field(salt)
    packed = _packed(token_ids[: num_blocks * block_size])
    stride = 8 * block_size
    hashes: list[int] = []
    for start in range(0, len(packed), stride):
        h = _digest(head + salt_field + packed[start : start + stride])
        hashes.append(h)
        head = b"\x01" + h.to_bytes(8, "little")
    return hashes


def _parent_field(parent: int | None) -> bytes:
    if parent is None:
        return _NO_PARENT
    if 0 <= parent < 2**64:
        return b"\x01" + parent.to_bytes(8, "little")
    raise ValueError(f"parent must be None or in [0, 2**64), got {parent}")


def _salt_field(salt: str) -> bytes:
    salt_bytes = salt.encode("utf-8")
    return len(salt_bytes).to_bytes(4, "little") + salt_bytes


def _packed(token_ids: Sequence[int]) -> bytes:
    try:
        return struct.pack(f"<{len(token_ids)}q", *token_ids)
    except struct.error as exc:
        raise ValueError(f"token_ids must be 64-bit ints: {exc}") from None


def _digest(message: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(message, digest_size=8).digest(), "little")


_NO_PARENT = b"\x00" + bytes(8)


def continue_chain(
    known: Sequence[int], token_ids: Sequence[int], block_size: int, salt: str = "",
    root: int | None = None,
) -> list[int]:
    """Chained hashes of every full block of ``token_ids``, given ``known``: hashes already
    computed for its leading blocks (extra ones past the full blocks are ignored). Only the
    blocks after them are hashed. ``root`` is the parent of the first block (``chain_root``)."""
    known = list(known[: len(token_ids) // block_size])
    rest = token_ids[len(known) * block_size :]
    return known + hash_token_blocks(rest, block_size, salt, known[-1] if known else root)


def chain_root(kv_cache_dtype: str) -> int | None:
    """The parent of a chain's first block in a cache of ``kv_cache_dtype``.

    None for ``auto``, so an unquantized cache hashes exactly as before; for a quantized one
    a hash of the dtype's name, so every block hash of an int8 or fp8 cache differs from the
    float cache's hash of the same tokens (and from each other): prefix matches, imports and
    anything keyed by block hash never mix quantized and unquantized blocks.
    """
    if kv_cache_dtype == "auto":
        return None
    h = hashlib.blake2b(b"ultrakv kv_cache_dtype\x00" + kv_cache_dtype.encode("utf-8"), digest_size=8)
    return int.from_bytes(h.digest(), "little")
