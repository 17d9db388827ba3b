"""Paged KV cache bookkeeping: fixed-size blocks, reference counts, prefix sharing by block hash.

A block's hash chains the hash of the block before it, the adapter's content hash and the block's
tokens, so two sequences share a block only when everything that shaped its K/V is the same (the
same text under a different adapter has different K/V). A block is registered under its hash only
after its K/V has been computed (`commit`), so nobody can attach to a block that is still empty.
Freed blocks keep their hash and sit in an LRU free list: a later prompt can revive them until the
space is handed to someone else.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int = -1  # -1: not registered (partial, or not computed yet)
    token_ids: tuple[int, ...] = field(default_factory=tuple)


def block_hash(token_ids: list[int], prev_hash: int, adapter_hash: str) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update(prev_hash.to_bytes(8, "little"))
    h.update(adapter_hash.encode())
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return int.from_bytes(h.digest(), "little")


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: dict[int, None] = dict.fromkeys(range(num_blocks))  # insertion order = LRU order
        self.hash_to_block: dict[int, int] = {}
        self.prefix_caching = enable_prefix_caching

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- prefix matching ---

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Registered blocks equal to seq's leading full blocks. The last token is never matched: the
        step needs at least one token to compute, to produce the next token's logits."""
        if not self.prefix_caching:
            return []
        hits, prev = [], 0
        for i in range((len(seq) - 1) // self.block_size):
            toks = seq.token_ids[i * self.block_size:(i + 1) * self.block_size]
            h = block_hash(toks, prev, seq.adapter_hash)
            bid = self.hash_to_block.get(h)
            if bid is None or self.blocks[bid].token_ids != tuple(toks):
                break
            hits.append(bid)
            prev = h
        return hits

    # --- verb pairs ---

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._prefix_hits(seq)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return self.blocks_for(len(seq)) - len(hits) + revived <= len(self.free)

    def allocate(self, seq: Sequence) -> None:
        """Blocks for all of seq's current tokens, shared prefix blocks first."""
        assert not seq.block_table
        hits = self._prefix_hits(seq)
        for bid in hits:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self.free[bid]
            block.ref_count += 1
        seq.block_table = list(hits)
        for _ in range(self.blocks_for(len(seq)) - len(hits)):
            seq.block_table.append(self._take_free())
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_hashed_blocks = len(hits)
        seq.last_block_hash = self.blocks[hits[-1]].hash if hits else 0

    def deallocate(self, seq: Sequence) -> None:
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[bid] = None
        seq.block_table = []
        seq.num_computed_tokens = seq.num_hashed_blocks = seq.last_block_hash = 0

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        need = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return need <= len(self.free)

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        need = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        for _ in range(max(need, 0)):
            seq.block_table.append(self._take_free())

    def commit(self, seq: Sequence) -> None:
        """Register the blocks whose K/V became complete in this step, for later prompts to share."""
        if not self.prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        for i in range(seq.num_hashed_blocks, full):
            toks = seq.token_ids[i * self.block_size:(i + 1) * self.block_size]
            h = block_hash(toks, seq.last_block_hash, seq.adapter_hash)
            block = self.blocks[seq.block_table[i]]
            if block.hash == -1 and h not in self.hash_to_block:
                block.hash, block.token_ids = h, tuple(toks)
                self.hash_to_block[h] = block.block_id
            seq.last_block_hash = h
        seq.num_hashed_blocks = max(full, seq.num_hashed_blocks)

    def _take_free(self) -> int:
        bid = next(iter(self.free))
        del self.free[bid]
        block = self.blocks[bid]
        if block.hash != -1 and self.hash_to_block.get(block.hash) == bid:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids, block.ref_count = -1, (), 1
        return bid
