"""One sequence's state: its tokens, how many have KV computed, its blocks, its adapter slot.

A request with n > 1 becomes n sequences that share the request id (and, through prefix hashes, the
prompt's KV blocks). The scheduler and block manager only ever read and write these fields; text,
stop strings and streaming offsets live here too so a sequence can be finished in one place.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

import torch

from engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


_ids = itertools.count()

# token id held in Sequence.token_ids for a token sampled by a step whose results are not read back yet
# (EngineConfig.async_steps): the next step reads the real id on the device, the engine writes it here later
PENDING = -1


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # completion index within its request (0..n-1)
    token_ids: list[int]
    params: SamplingParams
    adapter: Any = None  # adapter reference: a name, or a fusion mix; None = base model
    adapter_hash: str = ""  # content hash of the adapter (prefix-cache key), "" for the base model
    arrival: float = 0.0
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    num_prompt_tokens: int = 0
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # of those, how many came from shared prefix blocks at admission
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0  # leading blocks already registered for prefix sharing
    last_block_hash: int = 0  # chain hash of block num_hashed_blocks - 1
    lora_slot: int = -1  # slot in the adapter pool while running with an adapter, else -1
    generator: torch.Generator | None = None
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    num_preemptions: int = 0
    output_counts: Counter = field(default_factory=Counter)  # for presence/frequency penalties
    # text
    detokenizer: Any = None
    output_text: str = ""
    num_streamed_chars: int = 0
    num_streamed_tokens: int = 0
    logprobs: list = field(default_factory=list)  # per output token: (logprob, [(id, logprob), ...])
    # influence: sum over computed tokens of the mean |LoRA delta| / |base| across projections
    influence_sum: float = 0.0
    influence_tokens: int = 0
    # with a PENDING last token: its row among the sampled rows of the step that produces it
    pending_row: int = -1

    def __post_init__(self):
        self.num_prompt_tokens = self.num_prompt_tokens or len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        """Sampled tokens known on the host (a PENDING last one excluded)."""
        return self.token_ids[self.num_prompt_tokens:len(self.token_ids) - self.has_pending]

    @property
    def num_output_tokens(self) -> int:
        """Sampled tokens, a PENDING one included (min_tokens and max_tokens count it: it exists on the device)."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def has_pending(self) -> bool:
        return self.pending_row >= 0

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.output_counts[token_id] += 1

    def append_pending(self, row: int) -> None:
        """A token sampled in row `row` of a step still running: its id is read back later (resolve_pending)."""
        assert not self.has_pending, "a sequence has at most one token in flight"
        self.token_ids.append(PENDING)
        self.pending_row = row

    def resolve_pending(self, token_id: int) -> None:
        assert self.has_pending and self.token_ids[-1] == PENDING, "no token in flight"
        self.token_ids[-1] = token_id
        self.output_counts[token_id] += 1
        self.pending_row = -1
