"""Per-request influence statistics: how much of the output each adapter shaped.

During the forward pass every LoRA'd projection adds, per token, |LoRA delta| / |base output| into a
step buffer (engine.layers.linear); the runner averages it over projections, and each sequence sums it
over its tokens. On finish this becomes, per adapter:

    tokens       tokens served through the adapter (prompt + generated, recomputed ones once)
    delta_ratio  mean over tokens and LoRA'd projections of |delta| / |base|
    share        delta_ratio / (1 + delta_ratio): the adapter's fraction of the projection outputs,
                 in [0, 1), 0 when it changed nothing

A fused mix spreads its numbers over its members in proportion to |weight|.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdapterInfluence:
    adapter: str
    tokens: int
    delta_ratio: float
    share: float

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "delta_ratio": self.delta_ratio, "share": self.share}


def influence_of(adapter_ref, total: float, tokens: int) -> dict[str, AdapterInfluence]:
    if adapter_ref is None or tokens == 0:
        return {}
    ratio = total / tokens
    share = ratio / (1.0 + ratio)
    members = getattr(adapter_ref, "members", None)
    if not members:
        return {str(adapter_ref): AdapterInfluence(str(adapter_ref), tokens, ratio, share)}
    norm = sum(abs(w) for _, w in members) or 1.0
    return {name: AdapterInfluence(name, tokens, ratio * abs(w) / norm, share * abs(w) / norm)
            for name, w in members}
