"""Plain data exchanged between the serving layer (node/api) and the accountant (node/accounting).

The accountant sees a request twice: before the engine runs (`authorize`, with an upper bound on what
the request can cost) and after (`complete` with the measured `Usage`, or `cancel`). Both sides import
these dataclasses from here so neither depends on the other's module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["AdapterUsage", "MaxCostInput", "Usage", "Accountant"]


@dataclass(frozen=True)
class MaxCostInput:
    """The most a request can consume, known before it runs: what a reservation is sized on."""

    prompt_tokens: int  # tokens of one prompt (shared by the n choices)
    max_output_tokens: int  # n * max_tokens
    adapters: tuple[str, ...] = ()  # adapter names (members of a mix included); () = base model


@dataclass(frozen=True)
class AdapterUsage:
    """One adapter's part in a finished request."""

    name: str
    weight: float = 1.0  # mix weight; 1.0 for a single adapter
    # the engine's per-request influence statistics for this adapter, e.g. tokens served and the mean
    # |LoRA delta| / |base output| ratio; keys are the engine's, passed through unchanged
    influence: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Usage:
    """What a finished request actually consumed, measured by the engine."""

    request_id: str
    model: str  # the `model` the client asked for (base model id or adapter name)
    prompt_tokens: int
    completion_tokens: int  # summed over the n choices
    ttft_s: float | None  # seconds from arrival to the first output token (None: no token produced)
    total_s: float  # seconds from arrival to the last token
    adapters: tuple[AdapterUsage, ...] = ()
    finish_reasons: tuple[str, ...] = ()  # one per choice: "stop", "length", ...
    fusion: str | None = None  # "linear" | "ties" | "dare" for a mix, else None
    # the prompt's and the first choice's token ids: what per-request attribution differentiates
    prompt_token_ids: tuple[int, ...] = ()
    output_token_ids: tuple[int, ...] = ()

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Accountant(Protocol):
    """Who pays for a request. `authorize` raises a node.errors.ApiError subclass (401/402/404) to refuse;
    a refused request leaves nothing behind. The ticket is opaque to the serving layer."""

    async def authorize(self, request: Any, *, model: str, adapters: list[str],
                        max_cost_hint: MaxCostInput) -> Any: ...

    async def complete(self, ticket: Any, usage: Usage) -> str: ...

    async def cancel(self, ticket: Any) -> None: ...
