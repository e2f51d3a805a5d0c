"""Chained block hashes: stable across processes, prefix-sensitive, tenant-separated."""

import pytest
from ultrakv.cluster.block_hashing import hash_block, hash_token_blocks


def test_known_values_are_stable_across_processes():
    # Literal values: a change in layout or a switch to Python's salted hash() breaks these,
    # and with them every hash another node or an older checkpoint computed.
    assert hash_block(None, [1, 2, 3, 4]) == 242402632374942758
    assert hash_token_blocks(list(range(10)), 4) == [10824527195480378441, 7880304240793634835]
    assert hash_token_blocks(list(range(10)), 4, salt="t") == [
        1216739200572033889,
        13121614303391133467,
    ]


def test_only_full_blocks_are_hashed_and_they_chain():
    tokens = list(range(11))
    hashes = hash_token_blocks(tokens, 4)
    assert len(hashes) == 2
    assert hashes[0] == hash_block(None, tokens[0:4])
    assert hashes[1] == hash_block(hashes[0], tokens[4:8])
    assert hash_token_blocks(tokens[:3], 4) == []
    # Continuing a chain from a parent equals hashing the whole sequence.
    assert hash_token_blocks(tokens[4:8], 4, parent=hashes[0]) == hashes[1:]


def test_equal_prefixes_share_hashes_and_divergence_propagates():
    a = hash_token_blocks([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], 4)
    b = hash_token_blocks([1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0], 4)
    c = hash_token_blocks([9, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], 4)
    assert a[:2] == b[:2] and a[2] != b[2]
    # Same tokens in block 2 but a different first block: every later hash differs.
    assert all(x != y for x, y in zip(a, c, strict=True))


def test_salt_separates_tenants():
    tokens = list(range(8))
    assert hash_token_blocks(tokens, 4, salt="alice") == hash_token_blocks(tokens, 4, salt="alice")
    alice = hash_token_blocks(tokens, 4, salt="alice")
    bob = hash_token_blocks(tokens, 4, salt="bob")
    plain = hash_token_blocks(tokens, 4)
    assert not set(alice) & set(bob) and not set(alice) & set(plain)


def test_hashes_are_unsigned_64_bit():
    for h in hash_token_blocks(list(range(64)), 8, salt="x"):
        assert 0 <= h < 2**64


def test_invalid_inputs_name_the_field():
    with pytest.raises(ValueError, match="block_size must be >= 1, got 0"):
        hash_token_blocks([1, 2], 0)
    with pytest.raises(ValueError, match="token_ids"):
        hash_block(None, [2**64])
    with pytest.raises(ValueError, match="parent"):
        hash_block(-1, [1])


def test_continue_chain_equals_hashing_everything():
    from ultrakv.cluster.block_hashing import continue_chain

    tokens = list(range(70))
    full = hash_token_blocks(tokens, 16, "t")
    for k in (0, 1, 4, 9):  # known hashes of none, some, all and more than the full blocks
        known = hash_token_blocks(list(range(200)), 16, "t")[:k]
        assert continue_chain(known, tokens, 16, "t") == full
