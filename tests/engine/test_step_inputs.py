"""StepInputs: the flat per-token layout of a step (decode rows take a fast path; both must agree)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

import pytest

from engine.sequence import PENDING
from engine.step_inputs import StepInputs, copy_pending, int64_tensor, padded_tables, to_host


def _entry(tokens, computed, n, table, slot, sample=True, pending_row=-1):
    seq = SimpleNamespace(token_ids=tokens, num_computed_tokens=computed, block_table=table, lora_slot=slot,
                          pending_row=pending_row, has_pending=pending_row >= 0)
    return SimpleNamespace(seq=seq, num_new_tokens=n, sample=sample)


def test_decode_and_prefill_rows_lay_out_the_same_way():
    bs = 4
    prefill = _entry([11, 12, 13, 14, 15, 16], 0, 6, [7, 2], 3)
    decode = _entry([21, 22, 23, 24, 25, 26], 5, 1, [9, 5], -1)  # position 5: block 5, offset 1
    chunk = _entry([31, 32, 33, 34, 35], 1, 3, [8, 6], 0, sample=False)
    x = StepInputs.of(SimpleNamespace(scheduled=[prefill, decode, chunk]), bs)
    assert x.input_ids == [11, 12, 13, 14, 15, 16, 26, 32, 33, 34]
    assert x.positions == [0, 1, 2, 3, 4, 5, 5, 1, 2, 3]
    assert x.slot_mapping == [28, 29, 30, 31, 8, 9, 21, 33, 34, 35]
    assert x.token_slots == [3] * 6 + [-1] + [0] * 3
    assert x.seq_lens == [6, 6, 4] and x.qsl == [0, 6, 7, 10] and x.logits_rows == [5, 6]
    # the decode row through the general path (n == 1 as a one-token chunk) gives the same fields
    one = StepInputs.of(SimpleNamespace(scheduled=[decode]), bs)
    assert (one.input_ids, one.positions, one.slot_mapping) == ([26], [5], [21])


def test_padded_tables_and_int64_tensor():
    rows = [_entry([], 0, 1, [4, 5, 6], 0), _entry([], 0, 1, [1], 0)]
    assert padded_tables(rows, 3, -1) == [4, 5, 6, 1, -1, -1]
    assert padded_tables(rows, 4, 0) == [4, 5, 6, 0, 1, 0, 0, 0]
    t = int64_tensor([3, -1, 2**40])
    assert t.dtype == torch.int64 and t.tolist() == [3, -1, 2**40]
    assert int64_tensor([]).shape == (0,)


def test_pending_tokens_are_read_from_the_previous_steps_ids_on_the_device():
    """Rows whose token is still in flight (async steps) name their source row among the previous step's
    sampled ids; copy_pending puts those ids in place and leaves every other row alone."""
    bs = 4
    a = _entry([1, 2, 3, PENDING], 3, 1, [0], 0, pending_row=2)  # decode row, its token sampled in row 2
    b = _entry([5, 6, 7], 2, 1, [1], -1)  # decode row with a known token
    c = _entry([8, 9, PENDING], 1, 2, [2], 0, pending_row=0)  # two tokens, the last one in flight
    x = StepInputs.of(SimpleNamespace(scheduled=[a, b, c]), bs)
    assert x.input_ids == [PENDING, 7, 9, PENDING]
    assert (x.pending_dst, x.pending_src) == ([0, 3], [2, 0])
    ids = torch.tensor(x.input_ids)
    prev = torch.tensor([40, 41, 42])
    copy_pending(ids, torch.tensor(x.pending_dst + x.pending_src), prev)
    assert ids.tolist() == [42, 7, 9, 40]
    copy_pending(ids, torch.zeros(0, dtype=torch.int64), None)  # nothing in flight: nothing needed
    with pytest.raises(RuntimeError, match="no previous step"):
        copy_pending(ids, torch.tensor([0, 1]), None)


def test_to_host_copies_a_cpu_tensor():
    """The source may be a static buffer the next step overwrites before the copy is read."""
    buf = torch.arange(4.0)
    out = to_host(buf[:3])
    buf.zero_()
    assert out.tolist() == [0.0, 1.0, 2.0]
