"""Merkle tree of docs/formats.md: sorted double-hashed leaves, commutative pairs, odd node carried up."""

from __future__ import annotations

import pytest
from eth_utils import keccak
from hypothesis import given, settings
from hypothesis import strategies as st

from attribution.errors import InvalidInput
from attribution.merkle import batch_id_of, hash_pair, leaf_of, levels, proof_for, root_of, sorted_leaves, verify


def digests(n):
    return [keccak(text=f"receipt-{i}") for i in range(n)]


def test_leaf_is_double_keccak_of_the_digest():
    d = digests(1)[0]
    assert leaf_of(d) == keccak(keccak(d))


def test_one_leaf_is_its_own_root_with_empty_proof():
    leaves = sorted_leaves(digests(1))
    assert root_of(leaves) == leaves[0] and proof_for(leaves, 0) == []


def test_three_leaves_carry_the_odd_one_up():
    a, b, c = sorted_leaves(digests(3))
    assert root_of([a, b, c]) == hash_pair(hash_pair(a, b), c)
    assert proof_for([a, b, c], 2) == [hash_pair(a, b)]


def test_duplicates_and_empty_batches_are_refused():
    with pytest.raises(InvalidInput):
        sorted_leaves(digests(2) * 2)
    with pytest.raises(InvalidInput):
        levels([])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 70), st.data())
def test_every_leaf_has_a_proof_and_a_wrong_leaf_fails(n, data):
    leaves = sorted_leaves(digests(n))
    root = root_of(leaves)
    i = data.draw(st.integers(0, n - 1))
    assert verify(proof_for(leaves, i), root, leaves[i])
    assert not verify(proof_for(leaves, i), root, leaf_of(keccak(text="other")))
    assert root_of(sorted_leaves(list(reversed(digests(n))))) == root  # order of input does not matter


def test_batch_id_is_keccak_of_abi_encoded_node_and_root():
    root = b"\x01" * 32
    assert batch_id_of(5, root) == keccak((5).to_bytes(32, "big") + root)
