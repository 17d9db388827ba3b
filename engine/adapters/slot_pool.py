"""The device tier: a fixed pool of adapter slots stored as stacked tensors per target module and layer.

Layout (docs/engine-kernels.md):
    lora_a[module][layer]: [num_slots, max_rank, in_features]   rows >= rank[slot] are zero
    lora_b[module][layer]: [num_slots, out_features, max_rank]  columns >= rank[slot] are zero
    rank: [num_slots] int32 (0 = empty)   scale: [num_slots] float32
Bookkeeping follows nano-vllm's BlockManager: a free list, reference counts, `can_load` / `acquire` /
`release`, and a slot with references is never handed to another adapter. Eviction takes the least
recently used slot with no references whose adapter is not pinned.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

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
    lora_a: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    lora_b: dict[str, list[torch.Tensor]] = field(default_factory=dict)
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
        for m in target_modules:
            fan_in, fan_out = shapes[m]
            pool.lora_a[m] = [torch.zeros(num_slots, max_rank, fan_in, device=device, dtype=dtype)
                              for _ in range(n_layers)]
            pool.lora_b[m] = [torch.zeros(num_slots, fan_out, max_rank, device=device, dtype=dtype)
                              for _ in range(n_layers)]
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
        """Copy an adapter into a slot: zero the slot, copy each module's A/B into the leading rows/cols."""
        assert weights.rank <= self.max_rank
        self._wait_release(index, stream)
        non_blocking = self.device.type == "cuda"
        for m in self.target_modules:
            for layer in range(self.num_layers):
                a_dst, b_dst = self.lora_a[m][layer][index], self.lora_b[m][layer][index]
                pair = weights.tensors.get((m, layer))
                if pair is None:
                    a_dst.zero_()
                    b_dst.zero_()
                    continue
                a, b = pair
                r = a.shape[0]
                a_dst[:r].copy_(a, non_blocking=non_blocking)
                a_dst[r:].zero_()
                b_dst[:, :r].copy_(b, non_blocking=non_blocking)
                b_dst[:, r:].zero_()
        self.rank[index] = weights.rank
        self.scale[index] = weights.scale

    def clear(self, index: int, stream=None) -> None:
        self._wait_release(index, stream)
        for m in self.target_modules:
            for layer in range(self.num_layers):
                self.lora_a[m][layer][index].zero_()
                self.lora_b[m][layer][index].zero_()
        self.rank[index] = 0
        self.scale[index] = 0.0
