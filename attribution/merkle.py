"""Merkle tree of a settlement batch, exactly as docs/formats.md fixes it (OpenZeppelin MerkleProof
compatible): double-hashed leaves sorted ascending, commutative inner nodes (keccak of min ‖ max),
levels built pairwise left to right, an odd last node carried up unchanged."""

from __future__ import annotations

from collections.abc import Sequence

from eth_abi import encode as abi_encode
from eth_utils import keccak

from attribution.errors import InvalidInput


def leaf_of(digest: bytes) -> bytes:
    """keccak256(bytes.concat(keccak256(abi.encode(bytes32 digest)))): the double hash keeps a leaf
    (64 bytes never hashed alone) from ever being mistaken for an inner node."""
    return keccak(keccak(abi_encode(["bytes32"], [digest])))


def hash_pair(a: bytes, b: bytes) -> bytes:
    return keccak(a + b) if a <= b else keccak(b + a)


def sorted_leaves(digests: Sequence[bytes]) -> list[bytes]:
    leaves = sorted(leaf_of(d) for d in digests)
    for x, y in zip(leaves, leaves[1:]):
        if x == y:
            raise InvalidInput(f"duplicate receipt digest in batch (leaf 0x{x.hex()})")
    return leaves


def levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    """All levels, leaves first, root level last. `leaves` must already be sorted and unique."""
    if not leaves:
        raise InvalidInput("a Merkle tree needs at least one leaf")
    out = [list(leaves)]
    while len(out[-1]) > 1:
        cur = out[-1]
        nxt = [hash_pair(cur[i], cur[i + 1]) for i in range(0, len(cur) - 1, 2)]
        if len(cur) % 2:
            nxt.append(cur[-1])
        out.append(nxt)
    return out


def root_of(leaves: Sequence[bytes]) -> bytes:
    return levels(leaves)[-1][0]


def proof_for(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """Sibling hashes from leaf `index` up to the root (a carried-up node has no sibling at that level)."""
    if not 0 <= index < len(leaves):
        raise InvalidInput(f"leaf index {index} out of range (0..{len(leaves) - 1})")
    proof = []
    for level in levels(leaves)[:-1]:
        sibling = index ^ 1
        if sibling < len(level):
            proof.append(level[sibling])
        index //= 2
    return proof


def verify(proof: Sequence[bytes], root: bytes, leaf: bytes) -> bool:
    """What OpenZeppelin's MerkleProof.verify computes."""
    node = leaf
    for p in proof:
        node = hash_pair(node, p)
    return node == root


def batch_id_of(node_id: int, root: bytes) -> bytes:
    """keccak256(abi.encode(uint256 nodeId, bytes32 root)): same receipts -> same batch id."""
    return keccak(abi_encode(["uint256", "bytes32"], [node_id, root]))
