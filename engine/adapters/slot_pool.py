"""The device tier: a fixed pool of adapter slots stored as stacked tensors per target module and layer.

Layout (docs/engine-kernels.md):
    lora_a[module][layer]: [num_slots, max_rank, in_features]   rows >= rank[slot] are zero
    lora_b[module][layer]: [num_slots, out_features, max_rank]  columns >= rank[slot] are zero
    rank: [num_slots] int32 (0 = empty)   scale: [num_slots] float32
Storage: each module is ONE tensor over layers, a_stack[module] [num_layers, num_slots, max_rank, in] and
b_stack[module] [num_layers, num_slots, out, max_rank]; lora_a[module][layer] / lora_b[module][layer] are
views of it (contiguous, addresses fixed for the pool's life: CUDA graphs and the kernels' address tables
rely on that, so pool tensors are only ever written in place). A slot of one module across all layers is
then a single strided view, so writing an adapter is a few large copies per module, not four per layer:
with packed weights (engine.adapters.packed) on CUDA, one host -> device copy into a staging buffer, then
one device copy per A/B block (plus a zero of the padding ranks when the adapter's rank < max_rank).
Bookkeeping follows nano-vllm's BlockManager: a free list, reference counts, `can_load` / `acquire` /
`release`, and a slot with references is never handed to another adapter. Eviction takes the least
recently used slot with no references whose adapter is not pinned.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.adapters.packed import PackedBuffer
from engine.adapters.peft_format import AdapterWeights, module_shapes


@dataclass
class Slot:
    index: int
    key: str | None = None  # content hash (or mix hash) of the adapter held or being loaded
    refcount: int = 0
    ready: bool = False  # False while a load into it is in flight
    last_used: int = 0  # logical clock for LRU
    release_event: Any = None  # CUDA: recorded on the compute stream at release; loads wait on it


@dataclass
class SlotPool:
    num_slots: int
    max_rank: int
    target_modules: tuple[str, ...]
    num_layers: int
    device: torch.device
    dtype: torch.dtype
    lora_a: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # per-layer views of a_stack
    lora_b: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    a_stack: dict[str, torch.Tensor] = field(default_factory=dict)  # [num_layers, num_slots, max_rank, in]
    b_stack: dict[str, torch.Tensor] = field(default_factory=dict)  # [num_layers, num_slots, out, max_rank]
    staging: torch.Tensor | None = None  # CUDA: device copy of one packed adapter (one slot's worth)
    rank: torch.Tensor = None
    scale: torch.Tensor = None
    slots: list[Slot] = field(default_factory=list)
    free: deque = field(default_factory=deque)
    clock: int = 0

    @classmethod
    def create(cls, model_config: Any, num_slots: int, max_rank: int, target_modules: tuple[str, ...],
               device: torch.device, dtype: torch.dtype) -> SlotPool:
        shapes = module_shapes(model_config)
        n_layers = int(model_config.num_hidden_layers)
        pool = cls(num_slots, max_rank, target_modules, n_layers, device, dtype)
        slot_numel = 0
        for m in target_modules:
            fan_in, fan_out = shapes[m]
            pool.a_stack[m] = torch.zeros(n_layers, num_slots, max_rank, fan_in, device=device, dtype=dtype)
            pool.b_stack[m] = torch.zeros(n_layers, num_slots, fan_out, max_rank, device=device, dtype=dtype)
            pool.lora_a[m] = list(pool.a_stack[m].unbind(0))
            pool.lora_b[m] = list(pool.b_stack[m].unbind(0))
            slot_numel += n_layers * max_rank * (fan_in + fan_out)
        if device.type == "cuda":
            # allocated now, with the pool, so that memory planning done after the cache exists sees it
            pool.staging = torch.empty(slot_numel, device=device, dtype=dtype)
        pool.rank = torch.zeros(num_slots, dtype=torch.int32, device=device)
        pool.scale = torch.zeros(num_slots, dtype=torch.float32, device=device)
        pool.slots = [Slot(i) for i in range(num_slots)]
        pool.free = deque(range(num_slots))
        return pool

    # --- bookkeeping (the caller holds the cache lock) ---

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def _victim(self, protected: set[str]) -> Slot | None:
        candidates = [s for s in self.slots
                      if s.key is not None and s.ready and s.refcount == 0 and s.key not in protected]
        return min(candidates, key=lambda s: s.last_used, default=None)

    def can_load(self, protected: set[str]) -> bool:
        return bool(self.free) or self._victim(protected) is not None

    def acquire(self, key: str, protected: set[str]) -> tuple[int, str | None] | None:
        """Reserve a slot for `key`: a free one, else evict the LRU unreferenced unpinned one.
        Returns (slot, evicted key or None), or None when every slot is in use or pinned."""
        evicted = None
        if self.free:
            slot = self.slots[self.free.popleft()]
        else:
            slot = self._victim(protected)
            if slot is None:
                return None
            evicted = slot.key
        slot.key, slot.refcount, slot.ready, slot.last_used = key, 0, False, self.tick()
        return slot.index, evicted

    def incref(self, index: int) -> None:
        slot = self.slots[index]
        assert slot.ready and slot.key is not None, "reference to a slot that is not loaded"
        slot.refcount += 1
        slot.last_used = self.tick()

    def decref(self, index: int) -> int:
        slot = self.slots[index]
        assert slot.refcount > 0, f"release of slot {index} without a reference"
        slot.refcount -= 1
        slot.last_used = self.tick()
        if slot.refcount == 0 and self.device.type == "cuda":
            # kernels reading this slot may still be queued on the compute stream: a later load into
            # it waits for this event before overwriting
            slot.release_event = torch.cuda.Event()
            slot.release_event.record(torch.cuda.current_stream(self.device))
        return slot.refcount

    def forget(self, index: int) -> None:
        """Return an unreferenced slot to the free list (its tensors are cleared by `clear`)."""
        slot = self.slots[index]
        assert slot.refcount == 0, f"slot {index} is in use"
        slot.key, slot.ready = None, False
        self.free.append(index)

    # --- tensor writes (the slot is reserved, so no lock is needed; on CUDA they run on `stream`) ---

    def _wait_release(self, index: int, stream) -> None:
        ev = self.slots[index].release_event
        if ev is not None and stream is not None:
            stream.wait_event(ev)

    def write(self, index: int, weights: AdapterWeights, stream=None) -> None:
        """Copy an adapter into a slot: each module's A/B into the leading rows/cols, the rest zeroed."""
        assert weights.rank <= self.max_rank
        if weights.packed is not None:
            self._write_packed(index, weights.packed, stream)
        else:
            self._write_pairs(index, weights, stream)
        self.rank[index] = weights.rank
        self.scale[index] = weights.scale

    def _write_packed(self, index: int, packed: PackedBuffer, stream) -> None:
        src = packed.buffer
        if self.staging is not None and src.device != self.device:
            assert src.numel() <= self.staging.numel(), "packed adapter larger than a slot"
            # the upload does not touch the slot, so it may overlap kernels still reading the old adapter
            src = self.staging[:src.numel()]
            src.copy_(packed.buffer, non_blocking=True)
        self._wait_release(index, stream)
        non_blocking = self.device.type == "cuda"
        for m in self.target_modules:
            a_slot, b_slot = self.a_stack[m][:, index], self.b_stack[m][:, index]  # [L, R, in], [L, out, R]
            blk = packed.layout.block(m)
            if blk is None:
                a_slot.zero_()
                b_slot.zero_()
                continue
            r = blk.rank
            a_slot[:, :r].copy_(packed.a(blk, src), non_blocking=non_blocking)
            b_slot[:, :, :r].copy_(packed.b(blk, src), non_blocking=non_blocking)
            if r < self.max_rank:
                a_slot[:, r:].zero_()
                b_slot[:, :, r:].zero_()

    def _write_pairs(self, index: int, weights: AdapterWeights, stream) -> None:
        """Unpacked weights (hand-built or synthetic): one batched copy and one batched zero call."""
        self._wait_release(index, stream)
        dst, src, zero = [], [], []
        for m in self.target_modules:
            if not any(key[0] == m for key in weights.tensors):
                zero += [self.a_stack[m][:, index], self.b_stack[m][:, index]]
                continue
            for layer in range(self.num_layers):
                a_dst, b_dst = self.lora_a[m][layer][index], self.lora_b[m][layer][index]
                pair = weights.tensors.get((m, layer))
                if pair is None:
                    zero += [a_dst, b_dst]
                    continue
                a, b = pair
                r = a.shape[0]
                dst += [a_dst[:r], b_dst[:, :r]]
                src += [a, b]
                if r < self.max_rank:
                    zero += [a_dst[r:], b_dst[:, r:]]
        if dst:
            torch._foreach_copy_(dst, src, non_blocking=self.device.type == "cuda")
        if zero:
            torch._foreach_zero_(zero)

    def clear(self, index: int, stream=None) -> None:
        self._wait_release(index, stream)
        for m in self.target_modules:
            self.a_stack[m][:, index].zero_()
            self.b_stack[m][:, index].zero_()
        self.rank[index] = 0
        self.scale[index] = 0.0
