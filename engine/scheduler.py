"""Who runs next: continuous batching under a token budget, with chunked prefill.

Every step the scheduler hands the runner one `SchedulerOutput`. A sequence's work is simply "the
tokens whose KV is not computed yet" (`len(seq) - num_computed_tokens`): a decode has one, a prefill
has the prompt, a chunked prefill takes what the budget allows, a preempted sequence recomputes
everything. Prefills and decodes of different adapters share the step.

Order of business each step:
1. Running sequences, oldest first, each gets its tokens (decodes first in effect, since they are
   older). When the KV cache is full the youngest running sequence is preempted (blocks freed, back to
   the front of the queue, recomputed later).
2. Waiting sequences are admitted first-come-first-served while the token budget, `max_num_seqs`
   and free KV blocks allow. A request whose adapter is still loading is skipped (its load goes on in
   the background) without holding back the requests behind it; a request that does not fit the KV
   cache stops admission, so later small requests cannot starve an earlier large one.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from engine.block_manager import BlockManager
from engine.errors import EngineError
from engine.sequence import Sequence, SequenceStatus


class AdapterSlots(Protocol):
    """The part of engine.adapters.AdapterCache the scheduler needs."""

    def request(self, ref, wait_s: float = 0.0) -> int | None: ...

    def release(self, slot: int) -> None: ...


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int  # tokens of this step: token_ids[num_computed : num_computed + num_new_tokens]
    sample: bool  # True when the step reaches the end of the known tokens: a new token is sampled


@dataclass
class SchedulerOutput:
    # in batch order: the runner lays the tokens out in this order
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    # total tokens of the step (<= max_num_batched_tokens)
    num_batched_tokens: int = 0
    # sequences preempted in this step (their blocks were freed; they wait to be recomputed)
    preempted: list[Sequence] = field(default_factory=list)
    # waiting sequences skipped because their adapter is not resident yet
    num_waiting_for_adapter: int = 0
    # sequences ended because their adapter failed to load: (sequence, error message)
    failed: list[tuple[Sequence, str]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 adapters: AdapterSlots | None = None, adapter_wait_s: float = 0.0,
                 max_model_len: int | None = None):
        self.bm = block_manager
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.adapters = adapters
        # per step: how long admission may wait for adapter loads it starts to be queued on the device, so
        # their requests join this step (EngineConfig.adapter_admit_wait_ms)
        self.adapter_wait_s = adapter_wait_s
        self._wait_left = 0.0
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        self._wait_left = self.adapter_wait_s

        # 1. running sequences, oldest first
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.has_pending and self._last_token_in_flight(seq):
                i += 1  # ends with the token in flight (EngineConfig.async_steps): nothing to compute after it
                continue
            n = min(len(seq) - seq.num_computed_tokens, budget)
            while not self.bm.can_append(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue  # seq preempted itself; running[i] is now the next one
            self.bm.append_slots(seq, n)
            out.scheduled.append(self._entry(seq, n))
            budget -= n
            i += 1

        # 2. admission, FCFS; none after a preemption in this step (the cache is full)
        if not out.preempted:
            for seq in list(self.waiting):
                if budget <= 0 or len(self.running) >= self.max_num_seqs:
                    break
                if self._sibling_prefilling(seq):
                    continue  # admitted once its sibling's prompt blocks are cached, to share them
                try:
                    acquired = self._acquire_slot(seq)
                except EngineError as exc:  # the adapter's background load failed: end this request only
                    self.finish(seq, "error")
                    out.failed.append((seq, str(exc)))
                    continue
                if not acquired:
                    out.num_waiting_for_adapter += 1
                    continue
                if not self.bm.can_allocate(seq):
                    self._release_slot(seq)
                    break
                self.bm.allocate(seq)
                n = min(len(seq) - seq.num_computed_tokens, budget)
                self.waiting.remove(seq)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                out.scheduled.append(self._entry(seq, n))
                budget -= n
        out.num_batched_tokens = self.max_num_batched_tokens - budget
        return out

    def _sibling_prefilling(self, seq: Sequence) -> bool:
        """A request with n > 1 prefills its prompt once: completions 1..n-1 wait while an earlier sibling is
        still waiting or prefilling, then find the prompt's full blocks in the prefix cache (only the last,
        partial block is computed again). Without prefix caching there is nothing to share."""
        if seq.index == 0 or not self.bm.prefix_caching:
            return False
        for other in self.running:
            if other.request_id == seq.request_id and other.num_computed_tokens < other.num_prompt_tokens:
                return True
        return any(other.request_id == seq.request_id and other.index < seq.index for other in self.waiting)

    def _last_token_in_flight(self, seq: Sequence) -> bool:
        """Whether the sequence's PENDING token is its last by length (max_tokens or the model length): the
        engine finishes it when that token is read back, so computing the next one would be waste (and could
        need a block past the sequence's longest)."""
        if seq.num_output_tokens >= seq.params.max_tokens:
            return True
        return self.max_model_len is not None and len(seq) >= self.max_model_len

    def _entry(self, seq: Sequence, n: int) -> ScheduledSequence:
        return ScheduledSequence(seq, n, sample=seq.num_computed_tokens + n == len(seq))

    def postprocess(self, out: SchedulerOutput) -> None:
        """Book the step's computed tokens (before new tokens are appended) and register full blocks. A sequence
        finished meanwhile (stopped by the previous step's token, read back while this step ran; or aborted) is
        left alone: its blocks are freed and what this step computed for it is dropped."""
        for s in out.scheduled:
            if s.seq.is_finished:
                continue
            s.seq.num_computed_tokens += s.num_new_tokens
            self.bm.commit(s.seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence now (stop, length or abort): its blocks and adapter slot are freed at once."""
        if seq.status == SequenceStatus.FINISHED:
            return
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.bm.deallocate(seq)
        self._release_slot(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence) -> None:
        # Preemption by recompute: the KV is dropped and rebuilt from the tokens later. The adapter
        # reference is dropped too, so a waiting sequence never pins a slot.
        self.running.remove(seq)
        self.bm.deallocate(seq)
        self._release_slot(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _acquire_slot(self, seq: Sequence) -> bool:
        if seq.adapter is None or seq.lora_slot >= 0:
            return True
        t0 = time.perf_counter()
        slot = self.adapters.request(seq.adapter, wait_s=max(0.0, self._wait_left))
        self._wait_left -= time.perf_counter() - t0
        if slot is None:
            return False
        seq.lora_slot = slot
        return True

    def _release_slot(self, seq: Sequence) -> None:
        if seq.lora_slot >= 0:
            self.adapters.release(seq.lora_slot)
            seq.lora_slot = -1
