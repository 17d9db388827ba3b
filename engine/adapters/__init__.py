"""Adapters: PEFT LoRA parsing and validation, the disk/host/device cache, and runtime fusion.

    AdapterStore(dir)            adapter folders under a directory, served under their folder names
    AdapterCache(model_config, num_slots=..., max_rank=...)
        register(name, path) -> AdapterSpec      request(ref) -> slot | None      release(slot)
        spec / load / unload / pin / unpin / list / stats / close; cache.pool holds the slot tensors
    FusedMix(members=((name, weight), ...), strategy="linear" | "ties" | "dare", density, seed, rank)
    save_peft_adapter(dir, tensors, rank, alpha, target_modules, use_rslora, base_model)
"""

from engine.adapters.cache import AdapterCache, TierCounters
from engine.adapters.fusion import STRATEGIES, FusedMix, FusionReport
from engine.adapters.peft_format import (
    ALL_MODULES, AdapterSpec, AdapterWeights, check_name, content_hash, module_shapes, parse_adapter,
)
from engine.adapters.peft_io import save_peft_adapter
from engine.adapters.slot_pool import SlotPool
from engine.adapters.store import AdapterStore

__all__ = [
    "ALL_MODULES", "STRATEGIES", "AdapterCache", "AdapterSpec", "AdapterStore", "AdapterWeights", "FusedMix",
    "FusionReport", "SlotPool", "TierCounters", "check_name", "content_hash", "module_shapes", "parse_adapter",
    "save_peft_adapter",
]
