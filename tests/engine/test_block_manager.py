"""BlockManager: free list, reference counts, prefix sharing keyed by tokens and adapter content."""

from __future__ import annotations

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


def _seq(tokens, adapter_hash=""):
    return Sequence("r", 0, list(tokens), SamplingParams(), adapter_hash=adapter_hash)


def _computed(bm: BlockManager, seq: Sequence) -> None:
    seq.num_computed_tokens = len(seq)
    bm.commit(seq)


def test_allocate_and_free_return_every_block():
    bm = BlockManager(8, 4)
    s = _seq(range(10))
    assert bm.can_allocate(s)
    bm.allocate(s)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    bm.deallocate(s)
    assert bm.num_free_blocks == 8 and s.block_table == []


def test_cannot_allocate_beyond_free_blocks():
    bm = BlockManager(2, 4)
    assert not bm.can_allocate(_seq(range(9)))
    assert bm.can_allocate(_seq(range(8)))


def test_shared_prefix_reuses_computed_blocks_with_reference_counts():
    bm = BlockManager(16, 4)
    a = _seq(range(10))
    bm.allocate(a)
    _computed(bm, a)
    b = _seq(list(range(8)) + [99, 98, 97])
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.num_cached_tokens == 8
    assert b.block_table[2] != a.block_table[2]
    assert bm.blocks[a.block_table[0]].ref_count == 2
    bm.deallocate(a)
    assert bm.blocks[b.block_table[0]].ref_count == 1


def test_blocks_are_shared_only_after_their_kv_is_computed():
    bm = BlockManager(16, 4)
    a = _seq(range(12))
    bm.allocate(a)  # scheduled but not computed yet
    b = _seq(range(12))
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and set(a.block_table).isdisjoint(b.block_table)


def test_same_tokens_under_another_adapter_do_not_share():
    bm = BlockManager(16, 4)
    a = _seq(range(12), adapter_hash="sha-a")
    bm.allocate(a)
    _computed(bm, a)
    other = _seq(range(12), adapter_hash="sha-b")
    bm.allocate(other)
    assert other.num_cached_tokens == 0
    same = _seq(range(12), adapter_hash="sha-a")
    bm.allocate(same)
    assert same.num_cached_tokens == 8  # the last token is always recomputed for its logits


def test_freed_blocks_can_be_revived_until_reused():
    bm = BlockManager(4, 4)
    a = _seq(range(9))
    bm.allocate(a)
    _computed(bm, a)
    bm.deallocate(a)
    b = _seq(range(9))
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.num_cached_tokens == 8 and bm.num_free_blocks == 1
    bm.deallocate(b)
    # fill the whole cache with other content: the old hashes are dropped with their space
    c = _seq(range(100, 116))
    bm.allocate(c)
    bm.deallocate(c)
    d = _seq(range(9))
    bm.allocate(d)
    assert d.num_cached_tokens == 0


def test_append_slots_adds_a_block_at_the_boundary():
    bm = BlockManager(4, 4)
    s = _seq(range(4))
    bm.allocate(s)
    _computed(bm, s)
    s.append_token(7)
    assert bm.can_append(s, 1)
    bm.append_slots(s, 1)
    assert len(s.block_table) == 2
