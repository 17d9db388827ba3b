"""The host tier: adapters' weights in host memory (pinned on CUDA), least recently used evicted first,
bounded by bytes. Pinned adapters are never evicted. The caller holds the cache lock."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from engine.adapters.peft_format import AdapterWeights


@dataclass
class HostCache:
    capacity_bytes: int
    entries: OrderedDict = field(default_factory=OrderedDict)  # key -> AdapterWeights, LRU first
    used_bytes: int = 0
    evictions: int = 0

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str) -> AdapterWeights | None:
        w = self.entries.get(key)
        if w is not None:
            self.entries.move_to_end(key)
        return w

    def put(self, key: str, weights: AdapterWeights, protected: set[str]) -> list[str]:
        """Insert and evict LRU unprotected entries until the total fits. Returns the evicted keys.
        An adapter larger than the whole tier (after evictions) is not kept; loads still succeed with it
        because the loader holds its own reference until the device copy is done."""
        if key in self.entries:
            self.entries.move_to_end(key)
            return []
        size = weights.nbytes
        evictable = sum(w.nbytes for k, w in self.entries.items() if k not in protected)
        if self.used_bytes - evictable + size > self.capacity_bytes:
            return []  # would not fit even after evicting everything allowed: keep what is there
        evicted = []
        for k in list(self.entries):
            if self.used_bytes + size <= self.capacity_bytes:
                break
            if k in protected:
                continue
            self.remove(k)
            evicted.append(k)
            self.evictions += 1
        self.entries[key] = weights
        self.used_bytes += size
        return evicted

    def remove(self, key: str) -> bool:
        w = self.entries.pop(key, None)
        if w is None:
            return False
        self.used_bytes -= w.nbytes
        return True
