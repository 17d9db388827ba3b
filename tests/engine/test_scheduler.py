"""Scheduler rules on real sequences and a real BlockManager (no model needed for the decisions)."""

from __future__ import annotations

import pytest

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus


def _seq(n, rid="r", first=1):
    return Sequence(rid, 0, list(range(first, first + n)), SamplingParams())


def _run(sched: Scheduler, out, new_token: int = 5):
    """What the engine does after a forward pass: book computed tokens, append sampled ones."""
    sched.postprocess(out)
    for e in out.scheduled:
        if e.sample:
            e.seq.append_token(new_token)


def test_long_prompt_is_prefilled_in_chunks_within_the_token_budget():
    sched = Scheduler(BlockManager(32, 4), max_num_seqs=4, max_num_batched_tokens=16)
    s = _seq(40)
    sched.add(s)
    chunks = []
    for _ in range(3):
        out = sched.schedule()
        chunks.append((out.scheduled[0].num_new_tokens, out.scheduled[0].sample))
        _run(sched, out)
    assert chunks == [(16, False), (16, False), (8, True)]
    out = sched.schedule()
    assert out.scheduled[0].num_new_tokens == 1  # now decoding


def test_decode_and_prefill_share_a_step():
    sched = Scheduler(BlockManager(32, 4), max_num_seqs=4, max_num_batched_tokens=64)
    a = _seq(5, "a")
    sched.add(a)
    _run(sched, sched.schedule())
    b = _seq(7, "b", first=100)
    sched.add(b)
    out = sched.schedule()
    assert [(e.seq.request_id, e.num_new_tokens) for e in out.scheduled] == [("a", 1), ("b", 7)]
    assert out.num_batched_tokens == 8


def test_fcfs_head_that_does_not_fit_is_not_overtaken():
    sched = Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=64)
    first = _seq(12, "first")
    sched.add(first)
    _run(sched, sched.schedule())  # holds 3 of 4 blocks
    big, small = _seq(8, "big"), _seq(2, "small")
    sched.add(big)
    sched.add(small)
    out = sched.schedule()
    # small would fit in the last block, but admitting it would let it starve big
    assert [e.seq.request_id for e in out.scheduled] == ["first"]
    assert list(sched.waiting) == [big, small]


def test_max_num_seqs_limits_admission():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=256)
    for i in range(3):
        sched.add(_seq(3, str(i)))
    out = sched.schedule()
    assert len(out.scheduled) == 2 and len(sched.waiting) == 1


def test_youngest_is_preempted_when_blocks_run_out_and_requeued_first():
    sched = Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=64)
    old, young = _seq(8, "old"), _seq(8, "young", first=100)
    sched.add(old)
    sched.add(young)
    _run(sched, sched.schedule())  # both prefilled: all 4 blocks used, each needs a 3rd block now
    out = sched.schedule()
    assert out.preempted == [young] and young.status == SequenceStatus.WAITING
    assert young.block_table == [] and young.num_computed_tokens == 0
    assert [e.seq for e in out.scheduled] == [old]
    assert sched.waiting[0] is young
    _run(sched, out)
    sched.finish(old, "stop")
    out = sched.schedule()
    # recompute the prompt and the token generated before preemption, except the full block whose
    # freed KV was still cached under its hash
    assert out.scheduled[0].seq is young and young.num_cached_tokens == 4
    assert out.scheduled[0].num_new_tokens == 9 - 4


def test_finish_frees_blocks_at_once():
    bm = BlockManager(8, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    s = _seq(10)
    sched.add(s)
    sched.schedule()
    assert bm.num_free_blocks == 5
    sched.finish(s, "abort")
    assert bm.num_free_blocks == 8 and not sched.has_unfinished() and s.finish_reason == "abort"


class _Clock:
    """Stands in for the scheduler's time module: time moves only when a fake load waits."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class _SlowSlots:
    """Adapter slots whose loads are queued `ready_after` seconds after they start: request(wait_s) waits that
    long (on the fake clock) when wait_s allows, else all of wait_s, and hands the slot out only in the first case."""

    def __init__(self, clock: _Clock, ready_after: float):
        self.clock, self.ready_after = clock, ready_after
        self.calls: list[tuple[str, float]] = []
        self.slots: dict[str, int] = {}

    def request(self, ref, wait_s: float = 0.0):
        self.calls.append((ref, wait_s))
        if ref in self.slots:
            return self.slots[ref]
        if wait_s >= self.ready_after:
            self.clock.now += self.ready_after
            self.slots[ref] = len(self.slots)
            return self.slots[ref]
        self.clock.now += wait_s
        return None

    def release(self, slot: int) -> None:
        pass


def _adapter_seq(n, rid, adapter):
    s = Sequence(rid, 0, list(range(1, n + 1)), SamplingParams())
    s.adapter = adapter
    return s


def test_admission_waits_for_adapter_loads_within_one_budget_per_step(monkeypatch):
    """The wait budget is shared by the admissions of one step (each load's wait comes off it) and renewed every
    step; with no budget requests are asked once without waiting, as before."""
    from engine import scheduler as scheduler_mod

    clock = _Clock()
    monkeypatch.setattr(scheduler_mod, "time", clock)
    slots = _SlowSlots(clock, ready_after=0.03)
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=256, adapters=slots,
                      adapter_wait_s=0.05)
    for i, a in enumerate(("a", "b", "c")):
        sched.add(_adapter_seq(4, f"r{i}", a))
    out = sched.schedule()
    # a is ready within the 50 ms budget (30 ms); b gets the 20 ms left, waits them out, and is not ready; c
    # gets no wait at all
    assert [e.seq.request_id for e in out.scheduled] == ["r0"]
    assert slots.calls == [("a", 0.05), ("b", pytest.approx(0.02)), ("c", 0.0)]
    assert out.num_waiting_for_adapter == 2
    slots.calls.clear()
    out = sched.schedule()  # a new step, a new budget: b loads within it
    assert slots.calls[0] == ("b", 0.05)
    assert "r1" in [e.seq.request_id for e in out.scheduled]

    none = _SlowSlots(clock, ready_after=0.0)
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=256, adapters=none)
    sched.add(_adapter_seq(4, "r", "a"))
    sched.schedule()
    assert none.calls == [("a", 0.0)]
